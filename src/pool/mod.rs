//! The key pool: which provider key an attempt carries.
pub mod credentials;
pub mod keypool;
