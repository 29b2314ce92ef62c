//! The programs around the platform, apart from the test binaries so that
//! a test change does not relink them: `generate` (shop traffic into
//! Kafka), `quality` (spike detection and recommendations scored on a
//! generated week) and the `bench_batch` and `bench_speed` benchmarks. The
//! shop model, the generator and the fixture they use live in
//! `integration-tests`, whose tests use them too.

pub mod bench;
