//! The local stack's addresses, defined once: every binary's flags fall
//! back to their environment variable and then to these, which are what
//! `make up` starts (DESIGN.md, "Local defaults").

/// `DATABASE_URL`: the platform database.
pub const DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5433/lambda";
/// `SALES_DATABASE_URL`: the shop's database (the product catalog).
pub const SALES_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5433/sales";
/// `KAFKA_BROKERS`: the bootstrap servers.
pub const KAFKA_BROKERS: &str = "127.0.0.1:9092";
/// The topic the shop writes its events to.
pub const EVENTS_TOPIC: &str = "events";
/// The dead-letter topic of rejected records.
pub const DLQ_TOPIC: &str = "events.dlq";
