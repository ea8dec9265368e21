//! The `log` crate's lines, to Envoy's log through `proxy_log`.
//!
//! The level is `log`'s global maximum, which its macros check before formatting anything: a
//! `debug!` below the level Envoy logs at costs one comparison. `follow_log_level` (mod.rs) keeps
//! it at Envoy's level for the `wasm` component.

use super::abi::{self, LogLevel};
use log::{LevelFilter, Log, Metadata, Record};

struct HostLogger;

static LOGGER: HostLogger = HostLogger;

/// Once, from `_initialize`. A panic (none is expected: the crate denies the usual sources) is
/// logged at critical level before the VM aborts, as the SDK did.
pub fn init(level: LogLevel) {
    // Fails only if a logger is already set, which then goes on logging.
    let _ = log::set_logger(&LOGGER);
    set_level(level);
    std::panic::set_hook(Box::new(|info| {
        let _ = abi::log(LogLevel::Critical, &info.to_string());
    }));
}

pub fn set_level(level: LogLevel) {
    log::set_max_level(match level {
        LogLevel::Trace => LevelFilter::Trace,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Warn => LevelFilter::Warn,
        LogLevel::Error => LevelFilter::Error,
        // `log` has no critical level: tollgate's own lines all sit below it.
        LogLevel::Critical => LevelFilter::Off,
    });
}

impl Log for HostLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            log::Level::Trace => LogLevel::Trace,
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        // A line without arguments goes out as it is, without a copy.
        let _ = match record.args().as_str() {
            Some(line) => abi::log(level, line),
            None => abi::log(level, &record.args().to_string()),
        };
    }

    fn flush(&self) {}
}
