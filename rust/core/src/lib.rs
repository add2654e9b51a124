//! kvsync core: decoding of vLLM/SGLang KV-cache event payloads ([`wire`]),
//! kvsync's own prefix keys ([`prefix`]), and the exact prefix index
//! ([`index`]). No Python in here; the bindings live in `rust/py`.

pub mod error;
pub mod holders;
pub mod index;
pub mod prefix;
pub mod stream;
pub mod wire;

pub use error::{DecodeError, IndexError};
pub use index::{ApplyStats, Index, Query, Stats, WorkerCounters, WorkerStats};
pub use prefix::{Lora, Tier};
pub use stream::{payload_digest, Sink, State, Stream, StreamConfig, StreamCounters, Todo};
pub use wire::{decode, Batch, EngineHash, Event, Mode, Value};
