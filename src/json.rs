//! JSON values for everything the module reads and writes: configuration, request and response
//! bodies, translation between provider APIs.
//!
//! Why not serde_json: its deserializer, instantiated per type, and its number formatting were a
//! quarter of the Wasm module. This is the part tollgate needs: one value tree, a parser as strict as
//! the JSON grammar (RFC 8259), compact and pretty writers. The API follows serde_json's `Value`
//! where tollgate uses it, with two deliberate differences:
//! - objects keep their keys in the order written (a proxy should not reorder what it forwards);
//! - a number that is not a 64-bit integer keeps the text it was written with, so a translated
//!   request carries `temperature: 0.70` or a 30-digit seed exactly as the client sent it.

use core::fmt::{self, Write as _};

/// Nesting deeper than this is refused: the parser is recursive and the Wasm stack is small.
/// serde_json's limit (its counter of 128 runs out on the 128th level).
const MAX_DEPTH: usize = 127;

#[derive(Debug, Clone, Default, PartialEq)]
pub enum Value {
    #[default]
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Value>),
    Object(Map<String, Value>),
}

#[derive(Debug, Clone)]
pub struct Number(N);

#[derive(Debug, Clone)]
enum N {
    Pos(u64),
    Neg(i64),
    /// Fraction, exponent, `-0` or an integer beyond 64 bits: the text as written (grammar checked).
    Text(Box<str>),
}

impl Number {
    pub fn as_u64(&self) -> Option<u64> {
        match self.0 {
            N::Pos(n) => Some(n),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match self.0 {
            N::Pos(n) => i64::try_from(n).ok(),
            N::Neg(n) => Some(n),
            N::Text(_) => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match &self.0 {
            N::Pos(n) => Some(*n as f64),
            N::Neg(n) => Some(*n as f64),
            // `1e400` is valid JSON (serde_json refuses it) but no f64.
            N::Text(t) => t.parse().ok().filter(|f: &f64| f.is_finite()),
        }
    }
    pub fn is_u64(&self) -> bool {
        matches!(self.0, N::Pos(_))
    }
    /// None for NaN and infinities, which JSON cannot carry.
    pub fn from_f64(f: f64) -> Option<Number> {
        if !f.is_finite() {
            return None;
        }
        let mut s = String::new();
        let _ = write!(s, "{f}");
        // Rust writes 1.0 as "1": keep it a float, as it was one.
        if !s.contains(['.', 'e', 'E']) {
            s.push_str(".0");
        }
        Some(Number(N::Text(s.into_boxed_str())))
    }
}

/// By value, as JSON means them: `1`, `1.0` and `10e-1` are equal (serde_json's are not).
impl PartialEq for Number {
    fn eq(&self, other: &Number) -> bool {
        match (&self.0, &other.0) {
            (N::Pos(a), N::Pos(b)) => a == b,
            (N::Neg(a), N::Neg(b)) => a == b,
            (N::Text(a), N::Text(b)) if a == b => true,
            _ => self.as_f64().is_some() && self.as_f64() == other.as_f64(),
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            N::Pos(n) => write!(f, "{n}"),
            N::Neg(n) => write!(f, "{n}"),
            N::Text(t) => f.write_str(t),
        }
    }
}

/// A JSON object: keys in the order they were first written; a repeated key keeps its first place
/// and its last value (as serde_json).
#[derive(Debug, Clone)]
pub struct Map<K, V> {
    entries: Vec<(K, V)>,
}

impl Default for Map<String, Value> {
    fn default() -> Self {
        Map::new()
    }
}

impl PartialEq for Map<String, Value> {
    /// Order-insensitive, as objects are.
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl Map<String, Value> {
    pub fn new() -> Self {
        Map {
            entries: Vec::new(),
        }
    }
    pub fn with_capacity(n: usize) -> Self {
        Map {
            entries: Vec::with_capacity(n),
        }
    }
    fn position(&self, key: &str) -> Option<usize> {
        self.entries.iter().position(|(k, _)| k == key)
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Value> {
        self.entries
            .iter_mut()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }
    pub fn insert(&mut self, key: String, value: Value) -> Option<Value> {
        match self.position(&key) {
            Some(i) => self
                .entries
                .get_mut(i)
                .map(|e| core::mem::replace(&mut e.1, value)),
            None => {
                self.entries.push((key, value));
                None
            }
        }
    }
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.position(key)?;
        Some(self.entries.remove(i).1)
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.entries.iter().map(|(k, _)| k)
    }

    /// Entries as parsed, repeated keys merged without the quadratic cost of `insert`: an object
    /// of many keys is client input.
    fn from_parsed(mut entries: Vec<(String, Value)>) -> Self {
        let n = entries.len();
        let small_and_distinct =
            n <= 16 && (1..n).all(|j| entries[..j].iter().all(|(k, _)| *k != entries[j].0));
        if small_and_distinct {
            return Map { entries };
        }
        // Sorted by (key, position), a repeated key is a run whose first element is its first
        // occurrence and whose last is its last value.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        heapsort(&mut order, |a, b| (&entries[a].0, a) < (&entries[b].0, b));
        let mut dropped = vec![false; entries.len()];
        let mut moves = Vec::new();
        for run in order.chunk_by(|&a, &b| entries[a].0 == entries[b].0) {
            if let [first, .., last] = run {
                moves.push((*first, *last));
                for &i in &run[1..] {
                    dropped[i] = true;
                }
            }
        }
        let any = !moves.is_empty();
        for (first, last) in moves {
            let v = core::mem::take(&mut entries[last].1);
            entries[first].1 = v;
        }
        if any {
            let mut i = 0;
            entries.retain(|_| {
                i += 1;
                !dropped[i - 1]
            });
        }
        Map { entries }
    }
}

/// An in-place O(n log n) sort by `less`, whatever the input: core's sort is several KB of the
/// module for this one use, and the order here is total (key, then position), so stability is moot.
fn heapsort(v: &mut [usize], less: impl Fn(usize, usize) -> bool) {
    let sift = |v: &mut [usize], mut root: usize, end: usize| loop {
        let mut child = 2 * root + 1;
        if child >= end {
            return;
        }
        if child + 1 < end && less(v[child], v[child + 1]) {
            child += 1;
        }
        if !less(v[root], v[child]) {
            return;
        }
        v.swap(root, child);
        root = child;
    };
    for root in (0..v.len() / 2).rev() {
        sift(v, root, v.len());
    }
    for end in (1..v.len()).rev() {
        v.swap(0, end);
        sift(v, 0, end);
    }
}

impl IntoIterator for Map<String, Value> {
    type Item = (String, Value);
    type IntoIter = std::vec::IntoIter<(String, Value)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

impl<'a> IntoIterator for &'a Map<String, Value> {
    type Item = (&'a String, &'a Value);
    type IntoIter = core::iter::Map<
        core::slice::Iter<'a, (String, Value)>,
        fn(&'a (String, Value)) -> (&'a String, &'a Value),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter().map(|(k, v)| (k, v))
    }
}

impl FromIterator<(String, Value)> for Map<String, Value> {
    fn from_iter<I: IntoIterator<Item = (String, Value)>>(iter: I) -> Self {
        let mut m = Map::new();
        m.extend(iter);
        m
    }
}

impl Extend<(String, Value)> for Map<String, Value> {
    fn extend<I: IntoIterator<Item = (String, Value)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

// ------------------------------------------------------------------------------------- access

/// What `get` and `[]` accept: an object key or an array position.
pub trait Key {
    fn pick<'v>(&self, v: &'v Value) -> Option<&'v Value>;
    fn pick_mut<'v>(&self, v: &'v mut Value) -> Option<&'v mut Value>;
}

impl Key for str {
    fn pick<'v>(&self, v: &'v Value) -> Option<&'v Value> {
        v.as_object()?.get(self)
    }
    fn pick_mut<'v>(&self, v: &'v mut Value) -> Option<&'v mut Value> {
        v.as_object_mut()?.get_mut(self)
    }
}

impl Key for String {
    fn pick<'v>(&self, v: &'v Value) -> Option<&'v Value> {
        self.as_str().pick(v)
    }
    fn pick_mut<'v>(&self, v: &'v mut Value) -> Option<&'v mut Value> {
        self.as_str().pick_mut(v)
    }
}

impl Key for usize {
    fn pick<'v>(&self, v: &'v Value) -> Option<&'v Value> {
        v.as_array()?.get(*self)
    }
    fn pick_mut<'v>(&self, v: &'v mut Value) -> Option<&'v mut Value> {
        v.as_array_mut()?.get_mut(*self)
    }
}

impl<T: Key + ?Sized> Key for &T {
    fn pick<'v>(&self, v: &'v Value) -> Option<&'v Value> {
        (**self).pick(v)
    }
    fn pick_mut<'v>(&self, v: &'v mut Value) -> Option<&'v mut Value> {
        (**self).pick_mut(v)
    }
}

static NULL: Value = Value::Null;

impl<K: Key> core::ops::Index<K> for Value {
    type Output = Value;
    /// `Null` when absent, as serde_json: reading never panics.
    fn index(&self, key: K) -> &Value {
        key.pick(self).unwrap_or(&NULL)
    }
}

impl Value {
    pub fn get<K: Key>(&self, key: K) -> Option<&Value> {
        key.pick(self)
    }
    pub fn get_mut<K: Key>(&mut self, key: K) -> Option<&mut Value> {
        key.pick_mut(self)
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Number(n) => n.as_u64(),
            _ => None,
        }
    }
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Number(n) => n.as_i64(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => n.as_f64(),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_array_mut(&mut self) -> Option<&mut Vec<Value>> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
    pub fn as_object(&self) -> Option<&Map<String, Value>> {
        match self {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }
    pub fn as_object_mut(&mut self) -> Option<&mut Map<String, Value>> {
        match self {
            Value::Object(m) => Some(m),
            _ => None,
        }
    }
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
    pub fn is_boolean(&self) -> bool {
        matches!(self, Value::Bool(_))
    }
    pub fn is_number(&self) -> bool {
        matches!(self, Value::Number(_))
    }
    pub fn is_string(&self) -> bool {
        matches!(self, Value::String(_))
    }
    pub fn is_array(&self) -> bool {
        matches!(self, Value::Array(_))
    }
    pub fn is_object(&self) -> bool {
        matches!(self, Value::Object(_))
    }
    pub fn is_u64(&self) -> bool {
        self.as_u64().is_some()
    }
    /// The value, leaving `Null` in its place.
    pub fn take(&mut self) -> Value {
        core::mem::take(self)
    }
}

// ------------------------------------------------------------------------------- conversions

/// What `json!` accepts as a value. By reference, as serde_json's `json!`: its arguments are not
/// moved.
pub trait ToValue {
    fn to_value(&self) -> Value;
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}
impl ToValue for Map<String, Value> {
    fn to_value(&self) -> Value {
        Value::Object(self.clone())
    }
}
impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::String(self.to_owned())
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::String(self.clone())
    }
}
impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
}
impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Number::from_f64(*self).map_or(Value::Null, Value::Number)
    }
}
impl ToValue for Number {
    fn to_value(&self) -> Value {
        Value::Number(self.clone())
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, T::to_value)
    }
}
impl<T: ToValue> ToValue for [T] {
    fn to_value(&self) -> Value {
        Value::Array(self.iter().map(T::to_value).collect())
    }
}
impl<T: ToValue> ToValue for Vec<T> {
    fn to_value(&self) -> Value {
        self.as_slice().to_value()
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

macro_rules! unsigned {
    ($($t:ty)*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Number(Number(N::Pos(*self as u64)))
            }
        }
        impl From<$t> for Value {
            fn from(n: $t) -> Value {
                n.to_value()
            }
        }
    )*};
}
unsigned!(u8 u16 u32 u64 usize);

macro_rules! signed {
    ($($t:ty)*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                let n = *self as i64;
                Value::Number(Number(if n < 0 { N::Neg(n) } else { N::Pos(n as u64) }))
            }
        }
        impl From<$t> for Value {
            fn from(n: $t) -> Value {
                n.to_value()
            }
        }
    )*};
}
signed!(i8 i16 i32 i64 isize);

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Value {
        f.to_value()
    }
}
impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}
impl From<Vec<Value>> for Value {
    fn from(a: Vec<Value>) -> Value {
        Value::Array(a)
    }
}
impl FromIterator<Value> for Value {
    fn from_iter<I: IntoIterator<Item = Value>>(iter: I) -> Value {
        Value::Array(iter.into_iter().collect())
    }
}
impl From<Map<String, Value>> for Value {
    fn from(m: Map<String, Value>) -> Value {
        Value::Object(m)
    }
}
impl From<Number> for Value {
    fn from(n: Number) -> Value {
        Value::Number(n)
    }
}

impl PartialEq<str> for Value {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == Some(other)
    }
}
impl PartialEq<&str> for Value {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == Some(*other)
    }
}
impl PartialEq<String> for Value {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == Some(other.as_str())
    }
}
impl PartialEq<bool> for Value {
    fn eq(&self, other: &bool) -> bool {
        self.as_bool() == Some(*other)
    }
}
impl PartialEq<u64> for Value {
    fn eq(&self, other: &u64) -> bool {
        self.as_u64() == Some(*other)
    }
}
impl PartialEq<i64> for Value {
    fn eq(&self, other: &i64) -> bool {
        self.as_i64() == Some(*other)
    }
}
impl PartialEq<i32> for Value {
    fn eq(&self, other: &i32) -> bool {
        self.as_i64() == Some(i64::from(*other))
    }
}
impl PartialEq<f64> for Value {
    fn eq(&self, other: &f64) -> bool {
        self.as_f64() == Some(*other)
    }
}

/// `json!({"a": [1, x, {"b": null}]})`: object and array literals; any other value is an
/// expression whose type implements [`ToValue`] (taken by reference, not moved).
#[macro_export]
#[doc(hidden)]
macro_rules! __json_value {
    (null) => { $crate::json::Value::Null };
    ([]) => { $crate::json::Value::Array(::std::vec::Vec::new()) };
    ([ $($tt:tt)+ ]) => { $crate::json::Value::Array($crate::__json_value!(@seq [] [] $($tt)+)) };
    ({}) => { $crate::json::Value::Object($crate::json::Map::new()) };
    ({ $($tt:tt)+ }) => {{
        let mut object = $crate::json::Map::new();
        $crate::__json_value!(@key object $($tt)+);
        $crate::json::Value::Object(object)
    }};
    ($e:expr) => { $crate::json::ToValue::to_value(&$e) };

    // Array elements: tokens gathered up to a top-level comma make one element.
    (@seq [$($done:expr,)*] [$($cur:tt)+] , $($rest:tt)*) => {
        $crate::__json_value!(@seq [$($done,)* $crate::__json_value!($($cur)+),] [] $($rest)*)
    };
    (@seq [$($done:expr,)*] [$($cur:tt)*] $t:tt $($rest:tt)*) => {
        $crate::__json_value!(@seq [$($done,)*] [$($cur)* $t] $($rest)*)
    };
    (@seq [$($done:expr,)*] [$($cur:tt)+]) => {
        ::std::vec![$($done,)* $crate::__json_value!($($cur)+)]
    };
    (@seq [$($done:expr,)*] []) => { ::std::vec![$($done,)*] };

    // Object members: a literal or parenthesized key, `:`, then the value's tokens up to a comma.
    (@key $m:ident) => {};
    (@key $m:ident $k:literal : $($rest:tt)+) => { $crate::__json_value!(@member $m ($k) [] $($rest)+) };
    (@key $m:ident ($k:expr) : $($rest:tt)+) => { $crate::__json_value!(@member $m ($k) [] $($rest)+) };
    (@member $m:ident ($k:expr) [$($cur:tt)+] , $($rest:tt)*) => {
        $m.insert(::std::string::String::from($k), $crate::__json_value!($($cur)+));
        $crate::__json_value!(@key $m $($rest)*);
    };
    (@member $m:ident ($k:expr) [$($cur:tt)*] $t:tt $($rest:tt)*) => {
        $crate::__json_value!(@member $m ($k) [$($cur)* $t] $($rest)*)
    };
    (@member $m:ident ($k:expr) [$($cur:tt)+]) => {
        $m.insert(::std::string::String::from($k), $crate::__json_value!($($cur)+));
    };
}

pub use crate::__json_value as json;

// ------------------------------------------------------------------------------------ parsing

/// A parse error, worded as serde_json's (callers and clients already know those words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    what: &'static str,
    line: usize,
    column: usize,
}

impl Error {
    pub fn line(&self) -> usize {
        self.line
    }
    pub fn column(&self) -> usize {
        self.column
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at line {} column {}",
            self.what, self.line, self.column
        )
    }
}

impl std::error::Error for Error {}

pub fn from_str(s: &str) -> Result<Value, Error> {
    from_slice(s.as_bytes())
}

/// UTF-8 is checked inside strings only: anywhere else a non-ASCII byte is a grammar error.
pub fn from_slice(s: &[u8]) -> Result<Value, Error> {
    let mut p = Parser { s, i: 0, depth: 0 };
    let v = p.value()?;
    p.skip_ws();
    if p.i < p.s.len() {
        return Err(p.error_at_next("trailing characters"));
    }
    Ok(v)
}

/// The value of one member of a top-level object (the last, if repeated), with the rest of the
/// input checked as [`from_slice`] does but not built: reading `usage` out of a long completion
/// allocates only the usage. `Ok(None)` when the input is not an object or has no such member.
pub fn member(s: &[u8], key: &str) -> Result<Option<Value>, Error> {
    let mut p = Parser { s, i: 0, depth: 0 };
    let mut scratch = String::new();
    p.skip_ws();
    let mut found = None;
    if p.peek() == Some(b'{') {
        p.depth = 1;
        p.i += 1;
        p.members(&mut scratch, |p, k, scratch| {
            if k == key {
                found = Some(p.value()?);
                Ok(())
            } else {
                p.skip(scratch)
            }
        })?;
    } else {
        p.skip(&mut scratch)?;
    }
    p.skip_ws();
    if p.i < p.s.len() {
        return Err(p.error_at_next("trailing characters"));
    }
    Ok(found)
}

/// The character of a one-letter escape (`\\n` ...), shared with the stream usage reader.
pub(crate) fn short_escape(b: u8) -> Option<char> {
    Some(match b {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        _ => return None,
    })
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, what: &'static str) -> Error {
        let upto = self.s.get(..self.i.min(self.s.len())).unwrap_or_default();
        let line = 1 + upto.iter().filter(|&&b| b == b'\n').count();
        let column = match upto.iter().rposition(|&b| b == b'\n') {
            Some(nl) => upto.len() - nl - 1,
            None => upto.len(),
        };
        Error { what, line, column }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    /// The position is the offending byte's (1-based column), as serde_json reports it.
    fn error_at_next(&mut self, what: &'static str) -> Error {
        self.i += 1;
        self.error(what)
    }

    fn value(&mut self) -> Result<Value, Error> {
        self.skip_ws();
        let Some(b) = self.peek() else {
            return Err(self.error("EOF while parsing a value"));
        };
        match b {
            b'{' => self.nested(Self::object),
            b'[' => self.nested(Self::array),
            b'"' => {
                self.i += 1;
                self.string().map(Value::String)
            }
            b'-' | b'0'..=b'9' => self.number().map(Value::Number),
            b't' => self.word("true", Value::Bool(true)),
            b'f' => self.word("false", Value::Bool(false)),
            b'n' => self.word("null", Value::Null),
            _ => Err(self.error_at_next("expected value")),
        }
    }

    fn nested(&mut self, f: fn(&mut Self) -> Result<Value, Error>) -> Result<Value, Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error_at_next("recursion limit exceeded"));
        }
        self.i += 1;
        let v = f(self);
        self.depth -= 1;
        v
    }

    fn word(&mut self, w: &'static str, v: Value) -> Result<Value, Error> {
        for &want in w.as_bytes() {
            match self.peek() {
                None => return Err(self.error("EOF while parsing a value")),
                Some(b) if b == want => self.i += 1,
                Some(_) => return Err(self.error_at_next("expected ident")),
            }
        }
        Ok(v)
    }

    fn array(&mut self) -> Result<Value, Error> {
        let mut out = Vec::new();
        self.elements(|p| {
            out.push(p.value()?);
            Ok(())
        })?;
        Ok(Value::Array(out))
    }

    /// After the `[`: `each` reads one element at a time.
    fn elements(
        &mut self,
        mut each: impl FnMut(&mut Self) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.skip_ws();
        match self.peek() {
            Some(b']') => {
                self.i += 1;
                return Ok(());
            }
            None => return Err(self.error("EOF while parsing a list")),
            Some(_) => {}
        }
        loop {
            each(self)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.skip_ws();
                    if self.peek() == Some(b']') {
                        return Err(self.error_at_next("trailing comma"));
                    }
                }
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(_) => return Err(self.error_at_next("expected `,` or `]`")),
                None => return Err(self.error("EOF while parsing a list")),
            }
        }
    }

    fn object(&mut self) -> Result<Value, Error> {
        let mut out = Vec::new();
        let mut key = String::new();
        self.members(&mut key, |p, k, _| {
            let v = p.value()?;
            out.push((k.to_owned(), v));
            Ok(())
        })?;
        Ok(Value::Object(Map::from_parsed(out)))
    }

    /// After the `{`: each member's key (in `key`, reused) to `each`, which reads the value.
    fn members(
        &mut self,
        key: &mut String,
        mut each: impl FnMut(&mut Self, &str, &mut String) -> Result<(), Error>,
    ) -> Result<(), Error> {
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        let mut scratch = String::new();
        let mut first = true;
        loop {
            match self.peek() {
                Some(b'"') => self.i += 1,
                Some(_) => return Err(self.error_at_next("key must be a string")),
                None if first => return Err(self.error("EOF while parsing an object")),
                None => return Err(self.error("EOF while parsing a value")),
            }
            first = false;
            key.clear();
            self.string_into(key, true)?;
            self.skip_ws();
            match self.peek() {
                Some(b':') => self.i += 1,
                Some(_) => return Err(self.error_at_next("expected `:`")),
                None => return Err(self.error("EOF while parsing an object")),
            }
            each(self, key, &mut scratch)?;
            self.skip_ws();
            match self.peek() {
                Some(b',') => {
                    self.i += 1;
                    self.skip_ws();
                    if self.peek() == Some(b'}') {
                        return Err(self.error_at_next("trailing comma"));
                    }
                }
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(_) => return Err(self.error_at_next("expected `,` or `}`")),
                None => return Err(self.error("EOF while parsing an object")),
            }
        }
    }

    /// A value checked as [`Self::value`] checks it, without building it (strings go through
    /// `scratch`, reused).
    fn skip(&mut self, scratch: &mut String) -> Result<(), Error> {
        self.skip_ws();
        match self.peek() {
            Some(b'{') => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(self.error_at_next("recursion limit exceeded"));
                }
                self.i += 1;
                let mut key = String::new();
                self.members(&mut key, |p, _, scratch| p.skip(scratch))?;
                self.depth -= 1;
                Ok(())
            }
            Some(b'[') => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(self.error_at_next("recursion limit exceeded"));
                }
                self.i += 1;
                self.elements(|p| p.skip(scratch))?;
                self.depth -= 1;
                Ok(())
            }
            Some(b'"') => {
                self.i += 1;
                scratch.clear();
                self.string_into(scratch, false)
            }
            _ => self.value().map(drop),
        }
    }

    /// After the opening quote.
    fn string(&mut self) -> Result<String, Error> {
        let mut out = String::new();
        self.string_into(&mut out, true)?;
        Ok(out)
    }

    /// After the opening quote. `keep` false checks the text without copying it (escapes still
    /// land in `out`, which the caller clears).
    fn string_into(&mut self, out: &mut String, keep: bool) -> Result<(), Error> {
        let mut start = self.i;
        loop {
            let rest = self.s.get(self.i..).unwrap_or_default();
            let Some(n) = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            else {
                self.i = self.s.len();
                return Err(self.error("EOF while parsing a string"));
            };
            self.i += n;
            match rest.get(n) {
                Some(b'"') => {
                    self.push_text(out, start, keep)?;
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.push_text(out, start, keep)?;
                    self.i += 1;
                    self.escape(out)?;
                    start = self.i;
                }
                _ => {
                    return Err(self.error_at_next(
                        "control character (\\u0000-\\u001F) found while parsing a string",
                    ))
                }
            }
        }
    }

    fn push_text(&mut self, out: &mut String, start: usize, keep: bool) -> Result<(), Error> {
        let raw = self.s.get(start..self.i).unwrap_or_default();
        match core::str::from_utf8(raw) {
            Ok(text) => {
                if keep {
                    out.push_str(text);
                }
                Ok(())
            }
            Err(e) => {
                self.i = start + e.valid_up_to() + 1;
                Err(self.error("invalid unicode code point"))
            }
        }
    }

    fn escape(&mut self, out: &mut String) -> Result<(), Error> {
        let Some(b) = self.peek() else {
            return Err(self.error("EOF while parsing a string"));
        };
        self.i += 1;
        let c = match b {
            b'u' => {
                let hi = self.hex4()?;
                let code = if (0xD800..0xDC00).contains(&hi) {
                    // serde_json's positions: a `\\` is consumed before the missing `u` is seen.
                    if self.peek() == Some(b'\\') {
                        self.i += 1;
                    }
                    match self.peek() {
                        Some(b'u') if self.s.get(self.i - 1) == Some(&b'\\') => self.i += 1,
                        None => return Err(self.error("EOF while parsing a string")),
                        Some(_) => return Err(self.error_at_next("unexpected end of hex escape")),
                    }
                    let lo = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return Err(self.error("lone leading surrogate in hex escape"));
                    }
                    0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                } else {
                    hi
                };
                match char::from_u32(code) {
                    Some(c) => c,
                    None => return Err(self.error("invalid unicode code point")),
                }
            }
            _ => match short_escape(b) {
                Some(c) => c,
                None => return Err(self.error("invalid escape")),
            },
        };
        out.push(c);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32, Error> {
        if self.s.len().saturating_sub(self.i) < 4 {
            self.i = self.s.len();
            return Err(self.error("EOF while parsing a string"));
        }
        let (start, mut n) = (self.i, 0);
        for _ in 0..4 {
            let Some(b) = self.peek() else {
                return Err(self.error("EOF while parsing a string"));
            };
            let d = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => {
                    // Reported after the four characters, as serde_json reads them at once.
                    self.i = start + 4;
                    return Err(self.error("invalid escape"));
                }
            };
            self.i += 1;
            n = n * 16 + u32::from(d);
        }
        Ok(n)
    }

    fn digits(&mut self) -> usize {
        let from = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - from
    }

    fn number(&mut self) -> Result<Number, Error> {
        let start = self.i;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.i += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.error_at_next("invalid number"));
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            Some(_) => return Err(self.error_at_next("invalid number")),
            None => return Err(self.error("EOF while parsing a value")),
        }
        let int_end = self.i;
        let mut integer = true;
        if self.peek() == Some(b'.') {
            integer = false;
            self.i += 1;
            if self.digits() == 0 {
                return match self.peek() {
                    Some(_) => Err(self.error_at_next("invalid number")),
                    None => Err(self.error("EOF while parsing a value")),
                };
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            integer = false;
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return match self.peek() {
                    Some(_) => Err(self.error_at_next("invalid number")),
                    None => Err(self.error("EOF while parsing a value")),
                };
            }
        }
        // Only ASCII digits, signs, '.', 'e' were accepted above.
        let text =
            core::str::from_utf8(self.s.get(start..self.i).unwrap_or_default()).unwrap_or_default();
        if integer {
            let digits = text.get(usize::from(negative)..int_end - start);
            if let Some(Ok(n)) = digits.map(str::parse::<u64>) {
                if !negative {
                    return Ok(Number(N::Pos(n)));
                }
                if n != 0 {
                    if let Some(neg) = 0i64.checked_sub_unsigned(n) {
                        return Ok(Number(N::Neg(neg)));
                    }
                }
            }
        }
        Ok(Number(N::Text(text.into())))
    }
}

// ------------------------------------------------------------------------------------ writing

/// Never fails; `Result` keeps serde_json's signatures.
pub fn to_vec(v: &Value) -> Result<Vec<u8>, Error> {
    Ok(to_string(v)?.into_bytes())
}

pub fn to_string(v: &Value) -> Result<String, Error> {
    let mut out = String::new();
    write_value(&mut out, v, None);
    Ok(out)
}

/// Two-space indentation, as serde_json's pretty printer.
pub fn to_vec_pretty(v: &Value) -> Result<Vec<u8>, Error> {
    let mut out = String::new();
    write_value(&mut out, v, Some(0));
    Ok(out.into_bytes())
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::new();
        write_value(&mut out, self, None);
        f.write_str(&out)
    }
}

fn newline(out: &mut String, indent: Option<usize>) {
    if let Some(n) = indent {
        out.push('\n');
        for _ in 0..n {
            out.push_str("  ");
        }
    }
}

fn write_value(out: &mut String, v: &Value, indent: Option<usize>) {
    let inner = indent.map(|n| n + 1);
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_str(out, s),
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, inner);
                write_value(out, e, inner);
            }
            newline(out, indent);
            out.push(']');
        }
        Value::Object(m) if m.is_empty() => out.push_str("{}"),
        Value::Object(m) => {
            out.push('{');
            for (i, (k, e)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, inner);
                write_str(out, k);
                out.push_str(if indent.is_some() { ": " } else { ":" });
                write_value(out, e, inner);
            }
            newline(out, indent);
            out.push('}');
        }
    }
}

/// A JSON string literal; only what JSON requires is escaped (non-ASCII is written as is).
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(s.get(start..i).unwrap_or_default());
        if esc.is_empty() {
            let _ = write!(out, "\\u{:04x}", b);
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(s.get(start..).unwrap_or_default());
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde_json is the reference: same verdict, and the same value once ours is written out.
    fn same_as_serde(input: &str) {
        let ours = from_str(input);
        let theirs = serde_json::from_str::<serde_json::Value>(input);
        match (&ours, &theirs) {
            (Ok(v), Ok(t)) => {
                let written = to_string(v).unwrap_or_default();
                let back: serde_json::Value = serde_json::from_str(&written)
                    .unwrap_or_else(|e| panic!("{input:?}: we wrote {written:?}: {e}"));
                assert_eq!(&back, t, "{input:?} -> {written:?}");
                let pretty = to_vec_pretty(v).unwrap_or_default();
                let back: serde_json::Value = serde_json::from_slice(&pretty).unwrap_or_default();
                assert_eq!(&back, t, "{input:?} pretty");
            }
            (Err(o), Err(t)) => {
                assert_eq!(
                    o.to_string(),
                    t.to_string(),
                    "{input:?}: message and position"
                );
            }
            _ => panic!("{input:?}: ours {ours:?}, serde_json {theirs:?}"),
        }
    }

    #[test]
    fn values_and_verdicts_match_serde_json() {
        for input in [
            "null",
            "true",
            "false",
            "0",
            "-0",
            "1",
            "-1",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "1.5",
            "-1.5e-3",
            "1E10",
            "0.1",
            r#""""#,
            r#""a\"b\\c\/d\b\f\n\r\t""#,
            r#""\u00e9\ud83d\ude00 é 😀""#,
            r#""\u0000\u001f""#,
            "[]",
            "[1,2,[3,[4]]]",
            " { } ",
            r#"{"a":1,"b":[true,null],"c":{"d":"e"}}"#,
            r#"{"a":1,"a":2}"#,
            "\n\t [ 1 , 2 ] \r\n",
            // errors
            "",
            "   ",
            "x",
            "nul",
            "tru",
            "[1,]",
            r#"{"a":1,}"#,
            "[1 2]",
            r#"{"a" 1}"#,
            r#"{1:2}"#,
            r#"{"a":1"#,
            "[1",
            r#""abc"#,
            r#""\x""#,
            r#""\u12""#,
            r#""\ud800""#,
            r#""\ud800\u0041""#,
            "01",
            r#""\u`83d""#,
            r#""\ud83d\ude0x""#,
            r#""\ud83d\[x""#,
            r#""\ud83du""#,
            r#""\ud83d\"#,
            "1.",
            "1.e5",
            "-",
            "--1",
            "1e",
            "1e+",
            ".5",
            "+1",
            "[1] x",
            "{} {}",
            "\"a\u{1}b\"",
            "\"tab\there\"",
            "[\n1,\n2,\nx]",
            "{\"a\":\n  tru}",
            "NaN",
            "[-]",
            "{\"a\":}",
            "[1,",
            "[",
            "[ ",
            "{\"a\":",
            "{",
            "{\"a\"",
            "{\"a\":1,",
            "[1",
            "\"\\",
        ] {
            same_as_serde(input);
        }
    }

    #[test]
    fn member_reads_one_field_and_checks_the_rest_like_a_full_parse() {
        let body = r#"{"id":"x","choices":[{"message":{"content":"a \"long\" text é"}}],"usage":{"prompt_tokens":3},"usage":{"prompt_tokens":5}}"#;
        assert_eq!(
            member(body.as_bytes(), "usage"),
            Ok(Some(json!({"prompt_tokens": 5})))
        );
        assert_eq!(member(body.as_bytes(), "nope"), Ok(None));
        assert_eq!(member(b"[1,2]", "usage"), Ok(None));
        for bad in [
            r#"{"a":[1,}"#,
            r#"{"a":"\\ud800"}"#,
            r#"{"usage":1} x"#,
            r#"{"a":01}"#,
            "{\"a\":\"\u{1}\"}",
            r#"{"a":1"#,
        ] {
            assert_eq!(
                member(bad.as_bytes(), "usage").map_err(|e| e.to_string()),
                from_str(bad).map(|_| None).map_err(|e| e.to_string()),
                "{bad:?}"
            );
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(128), "]".repeat(128));
        assert_eq!(
            member(deep.as_bytes(), "usage").is_err(),
            from_str(&deep).is_err()
        );
    }

    #[test]
    fn heapsort_orders_like_the_standard_sort() {
        let mut seed = 7u64;
        for len in [0usize, 1, 2, 3, 10, 17, 100, 1000] {
            let keys: Vec<u64> = (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (seed >> 33) % 13
                })
                .collect();
            let mut ours: Vec<usize> = (0..len).collect();
            heapsort(&mut ours, |a, b| (keys[a], a) < (keys[b], b));
            let mut theirs: Vec<usize> = (0..len).collect();
            theirs.sort_by_key(|&i| (keys[i], i));
            assert_eq!(ours, theirs, "len {len}");
        }
    }

    #[test]
    fn pretty_output_is_laid_out_as_serde_json_s() {
        let input = r#"{"a":[1,{"b":null,"c":[]},{}],"d":"\\u00e9\\n","e":{"f":[true,false]}}"#;
        let ours = to_vec_pretty(&from_str(input).unwrap_or_default()).unwrap_or_default();
        let theirs = serde_json::to_vec_pretty(
            &serde_json::from_str::<serde_json::Value>(input).unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
    }

    #[test]
    fn a_repeated_key_keeps_its_first_place_and_its_last_value() {
        let v = from_str(r#"{"a":1,"b":2,"a":3}"#).unwrap_or_default();
        assert_eq!(to_string(&v).unwrap_or_default(), r#"{"a":3,"b":2}"#);
        let many: String = (0..40).map(|i| format!(r#""k{}":{i},"#, i % 7)).collect();
        let v = from_str(&format!("{{{}\"z\":0}}", many)).unwrap_or_default();
        let m = v.as_object().cloned().unwrap_or_default();
        assert_eq!(m.len(), 8);
        assert_eq!(
            m.keys().map(String::as_str).collect::<Vec<_>>(),
            ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "z"]
        );
        assert_eq!(v["k3"], 38);
        assert_eq!(v["k4"], 39);
        assert_eq!(v["k5"], 33);
    }

    #[test]
    fn many_keys_and_deep_nesting_are_handled_without_blowing_up() {
        let keys: String = (0..50_000).map(|i| format!(r#""key{i}":{i},"#)).collect();
        let v = from_str(&format!("{{{keys}\"last\":true}}")).unwrap_or_default();
        assert_eq!(v.as_object().map(Map::len), Some(50_001));
        assert_eq!(v["key49999"], 49_999);
        let deep = "[".repeat(128) + &"]".repeat(128);
        assert_eq!(
            from_str(&deep).map_err(|e| e.to_string()),
            Err("recursion limit exceeded at line 1 column 128".to_string())
        );
        same_as_serde(&deep);
        same_as_serde(&("{\"a\":".repeat(128) + "{}" + &"}".repeat(128)));
        let ok = "[".repeat(127) + &"]".repeat(127);
        same_as_serde(&ok);
        assert!(from_str(&ok).is_ok());
    }

    #[test]
    fn numbers_keep_the_text_they_were_written_with() {
        let v = from_str(
            r#"{"t":0.70,"seed":123456789012345678901234567890,"e":1.5e-6,"n":-42,"u":7}"#,
        )
        .unwrap_or_default();
        assert_eq!(
            to_string(&v).unwrap_or_default(),
            r#"{"t":0.70,"seed":123456789012345678901234567890,"e":1.5e-6,"n":-42,"u":7}"#
        );
        assert_eq!(v["t"].as_f64(), Some(0.7));
        assert_eq!(v["t"].as_u64(), None);
        assert_eq!(v["n"].as_i64(), Some(-42));
        assert_eq!(v["n"].as_u64(), None);
        assert_eq!(v["u"].as_u64(), Some(7));
        assert!(v["e"].is_number() && !v["e"].is_u64());
        assert_eq!(json!(1.0), from_str("1.0").unwrap_or_default());
        assert_eq!(to_string(&json!(0.25)).unwrap_or_default(), "0.25");
        assert_eq!(to_string(&json!(f64::NAN)).unwrap_or_default(), "null");
        assert_eq!(json!(0.5), json!(0.50));
        assert_eq!(json!(1), from_str("1.0").unwrap_or_default());
        assert_eq!(from_str("10e-1").unwrap_or_default(), json!(1));
        assert_ne!(json!(1), json!(2.0));
        let huge = from_str("1e400").unwrap_or_default();
        assert_eq!((huge.as_f64(), huge.to_string().as_str()), (None, "1e400"));
    }

    #[test]
    fn invalid_utf8_is_refused_where_it_is() {
        let e = from_slice(b"{\"a\":\"x\xff\"}").map_err(|e| e.to_string());
        let t = serde_json::from_slice::<serde_json::Value>(b"{\"a\":\"x\xff\"}")
            .map_err(|e| e.to_string());
        assert_eq!(e.clone().err(), t.err());
        assert!(e.is_err());
        let e = from_slice(b"[1 \xff]").map_err(|e| e.to_string());
        assert_eq!(e, Err("expected `,` or `]` at line 1 column 4".to_string()));
    }

    #[test]
    fn the_macro_builds_what_serde_json_s_does_without_moving_its_arguments() {
        let name = String::from("get_weather");
        let args = vec![1u64, 2];
        let opt: Option<&str> = None;
        let inner = json!({"x": [1, 2]});
        let v = json!({
            "type": "tool_use",
            "name": name,
            "n": args.len() + 1,
            "list": args,
            "nested": {"deep": [null, true, {"k": opt}], "neg": -3},
            "inner": inner,
            ("computed".to_string() + "_key"): name.len(),
            "last": [],
        });
        let expected = serde_json::json!({
            "type": "tool_use", "name": "get_weather", "n": 3, "list": [1, 2],
            "nested": {"deep": [null, true, {"k": null}], "neg": -3}, "inner": {"x": [1, 2]},
            "computed_key": 11, "last": [],
        });
        let back: serde_json::Value = serde_json::from_str(&v.to_string()).unwrap_or_default();
        assert_eq!(back, expected);
        assert_eq!(name, "get_weather");
        assert_eq!(json!([]), Value::Array(vec![]));
        assert_eq!(json!({}), Value::Object(Map::new()));
        assert_eq!(json!(null), Value::Null);
        assert_eq!(json!([1, "a",]), from_str(r#"[1,"a"]"#).unwrap_or_default());
    }

    #[test]
    fn access_never_panics_and_reads_like_serde_json() {
        let mut v = json!({"a": [10, {"b": "c"}]});
        assert_eq!(v["a"][1]["b"], "c");
        assert_eq!(v["zz"][3]["q"], Value::Null);
        assert_eq!(v.get("a").and_then(|a| a.get(0)), Some(&json!(10)));
        let key = String::from("a");
        assert!(v.get(&key).is_some());
        if let Some(b) = v.get_mut("a").and_then(|a| a.get_mut(1)) {
            *b = json!("replaced");
        }
        assert_eq!(v.to_string(), r#"{"a":[10,"replaced"]}"#);
        let taken = v["a"].clone();
        assert_eq!(v.as_object_mut().and_then(|m| m.remove("a")), Some(taken));
        assert_eq!(v.to_string(), "{}");
    }

    #[test]
    fn objects_compare_without_regard_to_order() {
        assert_eq!(
            from_str(r#"{"a":1,"b":2}"#).unwrap_or_default(),
            from_str(r#"{"b":2,"a":1}"#).unwrap_or_default()
        );
        assert_ne!(
            from_str(r#"{"a":1,"b":2}"#).unwrap_or_default(),
            from_str(r#"{"a":1}"#).unwrap_or_default()
        );
    }
}
