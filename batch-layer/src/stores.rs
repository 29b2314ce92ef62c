//! The object stores a Ballista session reads the lake through, in the
//! `run` process, the scheduler and every executor alike.
//!
//! A [`LakeFiles`](crate::lake_files::LakeFiles) scan names its store by URL
//! (`file:///`, `s3://BUCKET`); DataFusion looks it up in the session's
//! registry. Local files are always known; an `s3://` bucket's store is built
//! on first use from the usual `AWS_*` variables (endpoint, region, keys,
//! `AWS_ALLOW_HTTP`) and kept for the process's life, so executors need no
//! configuration beyond their environment.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::SessionState;
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::SessionConfig;
use object_store::ObjectStore;
use url::Url;

/// Object stores by URL: local files, and `s3://BUCKET` built on first use
/// from the `AWS_*` variables (endpoint, region, keys, `AWS_ALLOW_HTTP`).
#[derive(Debug, Default)]
pub struct LakeStores {
    known: DefaultObjectStoreRegistry,
    s3: RwLock<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl ObjectStoreRegistry for LakeStores {
    fn register_store(&self, url: &Url, store: Arc<dyn ObjectStore>) -> Option<Arc<dyn ObjectStore>> {
        self.known.register_store(url, store)
    }

    fn deregister_store(&self, url: &Url) -> DfResult<Arc<dyn ObjectStore>> {
        self.known.deregister_store(url)
    }

    fn get_store(&self, url: &Url) -> DfResult<Arc<dyn ObjectStore>> {
        if let Ok(store) = self.known.get_store(url) {
            return Ok(store);
        }
        if !matches!(url.scheme(), "s3" | "s3a") {
            return Err(DataFusionError::Configuration(format!("no object store for {url}")));
        }
        let bucket = url.host_str().unwrap_or_default().to_string();
        if let Some(store) = self.s3.read().map_err(|_| poisoned())?.get(&bucket) {
            return Ok(store.clone());
        }
        let store: Arc<dyn ObjectStore> =
            Arc::new(object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket).build()?);
        self.s3.write().map_err(|_| poisoned())?.insert(bucket, store.clone());
        Ok(store)
    }
}

fn poisoned() -> DataFusionError {
    DataFusionError::Internal("object store registry lock poisoned".into())
}

/// A runtime whose object stores are [`LakeStores`].
pub fn runtime_env() -> DfResult<Arc<RuntimeEnv>> {
    RuntimeEnvBuilder::new().with_object_store_registry(Arc::new(LakeStores::default())).build_arc()
}

/// A session state of `config` that reads the lake through [`LakeStores`].
pub fn session_state(config: SessionConfig) -> DfResult<SessionState> {
    Ok(datafusion::execution::SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime_env()?)
        .with_default_features()
        .build())
}
