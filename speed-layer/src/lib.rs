//! Speed layer: exactly-once, sub-second view deltas.
//!
//! * [`alerts`]: stalled or lagging partitions and DLQ rate, notified;
//! * [`stream`]: the consume → micro-batch → flush loop;
//! * [`deltas`]: view deltas of a micro-batch, from the shared view definitions;
//! * [`offsets`]: positions in PostgreSQL, advanced conditionally (fencing);
//! * [`history`]: what duplicates are judged against, kept with the positions;
//! * [`dlq`]: rejected records to `events.dlq` with their reason;
//! * [`lag`]: per-partition lag and event age as metrics;
//! * [`cli`]: the `speed-layer` command line.

pub mod alerts;
pub mod cli;
pub mod deltas;
pub mod dlq;
pub mod history;
pub mod lag;
pub mod offsets;
pub mod stream;
