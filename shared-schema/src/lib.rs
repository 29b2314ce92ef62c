//! Contracts shared by every layer of the platform.
//!
//! * [`event`]: the click event and its validation (parse, don't validate);
//! * [`schema`]: the Arrow schema of the lake's `events` table;
//! * [`decode`]: raw Kafka records → one Arrow batch plus rejections;
//! * [`dedup`]: the one rule by which both layers count an `event_id` once;
//! * [`views`]: the view definitions every layer executes;
//! * [`view_sql`]: view definitions read from SQL files, and their check;
//! * [`derived`]: the batch tables and PostgreSQL views built on the views;
//! * [`cut`]: partitions, offsets, segments and the offset cut;
//! * [`defaults`]: the local stack's addresses, which every flag falls back to.
//!
//! This crate holds contracts, not machinery: it depends on no Kafka or
//! PostgreSQL client. The SQL migrations live in the workspace's
//! `migrations/` folder and are applied by every binary at start.

pub mod cut;
pub mod decode;
pub mod dedup;
pub mod defaults;
pub mod derived;
pub mod event;
pub mod ids;
pub mod schema;
pub mod view_sql;
pub mod views;

pub use cut::{Offset, OffsetCut, Partition, Segment};
pub use decode::{Decoded, EventDecoder, RawRecord, RejectedRecord};
pub use event::{Event, EventType, RejectReason, Rejection};
pub use schema::{events_schema, rejected_schema};
pub use views::ViewDef;
