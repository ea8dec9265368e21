//! Consumers' budgets: quota windows in shared data, admission before a request goes upstream, and
//! settlement when its usage is known; limits on requests in flight.
pub mod admission;
pub mod consumer;
pub mod consumer_key;
pub mod header_names;
pub mod headers;
pub mod in_flight;
pub mod quota;
pub mod spread;
pub mod waiting;
