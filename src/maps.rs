//! The module's hash maps: hashbrown's, with its default hasher (foldhash). That hasher seeds
//! itself from addresses in the binary, so the instructions a lookup takes (its probes, its false
//! matches) move a little whenever the binary changes. The instruction-count benchmark (feature
//! `testing`, never in the Wasm module) fixes the seed of the same hash function: its counts then
//! move only when the code's work does.

#[cfg(not(feature = "testing"))]
pub type Hasher = hashbrown::DefaultHashBuilder;
#[cfg(feature = "testing")]
pub type Hasher = foldhash::fast::FixedState;

pub type HashMap<K, V> = hashbrown::HashMap<K, V, Hasher>;
pub type HashSet<K> = hashbrown::HashSet<K, Hasher>;
