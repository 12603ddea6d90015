//! docs/spec.md against the spec types: the reference cannot drift from the code.
//!
//! The field list comes from the types themselves, not from a list kept here: [`walk`] drives
//! `Spec`'s own `Deserialize` impl with a recording deserializer, which sees the field names
//! serde passes to `deserialize_struct` (nested structs too, through lists and options), the
//! variant names it passes to `deserialize_enum`, and which `deserialize_*` each value asks for.
//! Walking again with one field left out tells whether that field is required and, when it is
//! not, its default (the resulting `Spec` serialized back).
//!
//! The doc's side, by the convention stated at the top of docs/spec.md: every field is a
//! heading ``### `users[].shell` `` followed by `- **Type:** ...`, `- **Default:** ...`, for an
//! enum `- **Values:**` with one `` - `variant` `` item each, and prose.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::value::BorrowedStrDeserializer;
use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

use debimg::spec::Spec;

const DOC: &str = "docs/spec.md";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn doc_text() -> String {
    std::fs::read_to_string(repo_path(DOC)).expect("docs/spec.md exists")
}

// ---------------------------------------------------------------------------------------------
// The types' side: a deserializer that records what `Spec::deserialize` asks for.

/// What a value is, as its `Deserialize` impl asked for it.
#[derive(Debug, Clone, PartialEq)]
enum Shape {
    String,
    Integer,
    Number,
    Boolean,
    /// `deserialize_any`, with what the visitor says it expects (`Size`).
    Any(String),
    /// A struct; its fields are recorded as paths of their own.
    Object,
    /// A unit-variant enum and its serde names.
    Enum(Vec<&'static str>),
    /// A sequence; the element's shape is at `<path>[]`.
    List,
}

/// Everything one walk saw.
#[derive(Debug, Default)]
struct Recorded {
    /// Every struct field by path (`users[].shell`), in the order serde lists them.
    fields: Vec<String>,
    /// The shape of every value path (`users`, `users[]`, `users[].shell`).
    shapes: BTreeMap<String, Shape>,
}

#[derive(Debug)]
struct WalkError(String);

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WalkError {}

impl de::Error for WalkError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        WalkError(msg.to_string())
    }
}

/// The recording deserializer for the value at `path`. It hands every struct all its fields
/// (except `omit`), every sequence one element, every option `Some`, every enum its first
/// variant: one walk reaches every nested type.
struct Walker<'a> {
    rec: &'a RefCell<Recorded>,
    omit: Option<&'a str>,
    path: String,
}

impl<'a> Walker<'a> {
    fn at(&self, path: String) -> Walker<'a> {
        Walker {
            rec: self.rec,
            omit: self.omit,
            path,
        }
    }

    fn record(&self, shape: Shape) {
        self.rec
            .borrow_mut()
            .shapes
            .insert(self.path.clone(), shape);
    }

    fn unsupported(&self, what: &str) -> WalkError {
        WalkError(format!(
            "`{}` asks for {what}, which tests/spec_doc.rs's walker does not know yet: teach it \
             (and docs/spec.md) the new kind of field",
            self.path
        ))
    }
}

fn child(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

macro_rules! integers {
    ($($method:ident => $visit:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
            self.record(Shape::Integer);
            visitor.$visit(0)
        }
    )*};
}

macro_rules! unsupported {
    ($($method:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, WalkError> {
            Err(self.unsupported(stringify!($method)))
        }
    )*};
}

impl<'de> Deserializer<'de> for Walker<'_> {
    type Error = WalkError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        // Only a hand-written impl asks for "any" (`Size`, `Attachment`); say what it expects
        // so the doc's type can be checked, and feed it what it takes: a size a number, the
        // others a string.
        let expects = format!("{}", &visitor as &dyn de::Expected);
        let size = expects.contains("size");
        self.record(Shape::Any(expects));
        if size {
            visitor.visit_u64(1 << 30)
        } else {
            visitor.visit_str("/")
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::Boolean);
        visitor.visit_bool(false)
    }

    integers! {
        deserialize_i8 => visit_i64, deserialize_i16 => visit_i64, deserialize_i32 => visit_i64,
        deserialize_i64 => visit_i64, deserialize_u8 => visit_u64, deserialize_u16 => visit_u64,
        deserialize_u32 => visit_u64, deserialize_u64 => visit_u64,
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::Number);
        visitor.visit_f64(0.0)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::Number);
        visitor.visit_f64(0.0)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::String);
        visitor.visit_str("")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::String);
        visitor.visit_string(String::new())
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        // An option is its inner value at the same path; whether it may be left out is found
        // by leaving it out.
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, WalkError> {
        self.record(Shape::List);
        let element = self.at(format!("{}[]", self.path));
        visitor.visit_seq(OneElement(Some(element)))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        self.record(Shape::Object);
        let mut given = Vec::new();
        {
            let mut rec = self.rec.borrow_mut();
            for f in fields {
                let path = child(&self.path, f);
                if !rec.fields.contains(&path) {
                    rec.fields.push(path.clone());
                }
                if self.omit != Some(path.as_str()) {
                    given.push((*f, path));
                }
            }
        }
        visitor.visit_map(AllFields {
            walker: self.at(String::new()),
            given: given.into_iter(),
            value_path: None,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, WalkError> {
        self.record(Shape::Enum(variants.to_vec()));
        let first = *variants
            .first()
            .ok_or_else(|| WalkError(format!("`{}` is an enum without variants", self.path)))?;
        visitor.visit_enum(FirstVariant {
            name: first,
            walker: self,
        })
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _visitor: V,
    ) -> Result<V::Value, WalkError> {
        Err(self.unsupported("a unit struct"))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value, WalkError> {
        Err(self.unsupported("a tuple"))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        _visitor: V,
    ) -> Result<V::Value, WalkError> {
        Err(self.unsupported("a tuple struct"))
    }

    unsupported! {
        deserialize_char, deserialize_bytes, deserialize_byte_buf, deserialize_unit,
        deserialize_map, deserialize_identifier, deserialize_ignored_any,
    }
}

/// A sequence of one element.
struct OneElement<'a>(Option<Walker<'a>>);

impl<'de> SeqAccess<'de> for OneElement<'_> {
    type Error = WalkError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, WalkError> {
        self.0.take().map(|w| seed.deserialize(w)).transpose()
    }
}

/// A struct's fields as a map: every field serde listed, except the one left out.
struct AllFields<'a> {
    walker: Walker<'a>,
    given: std::vec::IntoIter<(&'static str, String)>,
    value_path: Option<String>,
}

impl<'de> MapAccess<'de> for AllFields<'_> {
    type Error = WalkError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, WalkError> {
        let Some((name, path)) = self.given.next() else {
            return Ok(None);
        };
        self.value_path = Some(path);
        seed.deserialize(BorrowedStrDeserializer::new(name))
            .map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, WalkError> {
        let path = self.value_path.take().expect("serde asks for a key first");
        seed.deserialize(self.walker.at(path))
    }
}

/// An enum value: its first variant, which must be a unit variant.
struct FirstVariant<'a> {
    name: &'static str,
    walker: Walker<'a>,
}

impl<'de, 'a> EnumAccess<'de> for FirstVariant<'a> {
    type Error = WalkError;
    type Variant = Walker<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Walker<'a>), WalkError> {
        let v = seed.deserialize(BorrowedStrDeserializer::new(self.name))?;
        Ok((v, self.walker))
    }
}

impl<'de> VariantAccess<'de> for Walker<'_> {
    type Error = WalkError;

    fn unit_variant(self) -> Result<(), WalkError> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        _seed: T,
    ) -> Result<T::Value, WalkError> {
        Err(self.unsupported("an enum variant with data"))
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _v: V) -> Result<V::Value, WalkError> {
        Err(self.unsupported("an enum variant with data"))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, WalkError> {
        Err(self.unsupported("an enum variant with data"))
    }
}

/// Deserializes a `Spec` from the recording deserializer, leaving out the field `omit`.
fn walk(omit: Option<&str>) -> (Recorded, Result<Spec, WalkError>) {
    let rec = RefCell::new(Recorded::default());
    let spec = Spec::deserialize(Walker {
        rec: &rec,
        omit,
        path: String::new(),
    });
    (rec.into_inner(), spec)
}

/// One field as the types define it.
#[derive(Debug)]
struct TypeField {
    /// `list of strings`, `enum`, ... as docs/spec.md writes it.
    ty: String,
    /// `required`, `none`, `empty`, or a backticked value.
    default: String,
    /// Serde names of the enum (of a list's elements), if it is one.
    variants: Option<Vec<&'static str>>,
}

/// Every field of the spec types by path, in serde's order.
fn type_fields() -> Vec<(String, TypeField)> {
    let (rec, spec) = walk(None);
    if let Err(e) = spec {
        panic!("walking the spec types failed: {e}");
    }
    assert!(
        rec.fields.len() > 20,
        "the walk found too few fields: {:?}",
        rec.fields
    );
    rec.fields
        .iter()
        .map(|path| {
            let ty = type_name(&rec.shapes, path);
            let variants = enum_variants(&rec.shapes, path);
            let default = default_of(path);
            (
                path.clone(),
                TypeField {
                    ty,
                    default,
                    variants,
                },
            )
        })
        .collect()
}

/// The type as docs/spec.md writes it: `string`, `integer`, `boolean`, `size`, `attachment`,
/// `object`, `enum`, or `list of <type>s`.
fn type_name(shapes: &BTreeMap<String, Shape>, path: &str) -> String {
    let shape = shapes
        .get(path)
        .unwrap_or_else(|| panic!("no shape recorded for `{path}`"));
    match shape {
        Shape::String => "string".into(),
        Shape::Integer => "integer".into(),
        Shape::Number => "number".into(),
        Shape::Boolean => "boolean".into(),
        Shape::Object => "object".into(),
        Shape::Enum(_) => "enum".into(),
        Shape::Any(expects) if expects.contains("size") => "size".into(),
        Shape::Any(expects) if *expects == debimg::spec::ATTACHMENT_EXPECTED => "attachment".into(),
        Shape::Any(expects) => panic!(
            "`{path}` is deserialized by hand (expecting {expects}): give its type a name in \
             tests/spec_doc.rs's type_name and docs/spec.md"
        ),
        Shape::List => {
            let inner = type_name(shapes, &format!("{path}[]"));
            assert!(!inner.starts_with("list"), "`{path}`: lists of lists");
            format!("list of {inner}s")
        }
    }
}

fn enum_variants(shapes: &BTreeMap<String, Shape>, path: &str) -> Option<Vec<&'static str>> {
    match shapes.get(path)? {
        Shape::Enum(v) => Some(v.clone()),
        Shape::List => enum_variants(shapes, &format!("{path}[]")),
        _ => None,
    }
}

/// `required` when a spec without the field fails to deserialize; else the value serde fills
/// in, as docs/spec.md writes it.
fn default_of(path: &str) -> String {
    let (_, spec) = walk(Some(path));
    let Ok(spec) = spec else {
        return "required".into();
    };
    let mut value = serde_json::to_value(&spec).expect("a spec serializes");
    for segment in path.split('.') {
        let (key, element) = match segment.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (segment, false),
        };
        value = value[key].clone();
        if element {
            value = value[0].clone();
        }
    }
    default_token(&value)
}

fn default_token(value: &serde_json::Value) -> String {
    use serde_json::Value;
    let is_empty = |v: &Value| match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    match value {
        Value::Null => "none".into(),
        Value::Array(a) if a.is_empty() => "empty".into(),
        Value::Object(m) if m.values().all(is_empty) => "empty".into(),
        Value::String(s) => format!("`{s}`"),
        Value::Bool(_) | Value::Number(_) => format!("`{value}`"),
        other => format!("`{other}`"),
    }
}

// ---------------------------------------------------------------------------------------------
// The doc's side.

/// One field entry of docs/spec.md.
#[derive(Debug, Default)]
struct DocEntry {
    line: usize,
    ty: Option<String>,
    default: Option<String>,
    values: Option<Vec<String>>,
    has_prose: bool,
}

/// The field entries of docs/spec.md by path, and the paths given more than one entry.
fn doc_entries(text: &str) -> (BTreeMap<String, DocEntry>, Vec<String>) {
    let mut entries: BTreeMap<String, DocEntry> = BTreeMap::new();
    let mut duplicates = Vec::new();
    let mut current: Option<(String, DocEntry)> = None;
    let mut in_fence = false;
    let mut in_values = false;
    let mut finish = |cur: Option<(String, DocEntry)>| {
        if let Some((path, e)) = cur
            && let Some(old) = entries.insert(path.clone(), e)
        {
            duplicates.push(format!("{path} (line {} and later)", old.line));
        }
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if !in_fence && line.starts_with('#') {
            finish(current.take());
            in_values = false;
            if let Some(path) = line
                .strip_prefix("### `")
                .and_then(|l| l.trim_end().strip_suffix('`'))
                .filter(|p| !p.contains('`'))
            {
                current = Some((
                    path.to_string(),
                    DocEntry {
                        line: i + 1,
                        ..DocEntry::default()
                    },
                ));
            }
            continue;
        }
        let Some((_, entry)) = current.as_mut() else {
            continue;
        };
        if in_values {
            if let Some(item) = line.strip_prefix("  - `") {
                let name = item.split('`').next().unwrap_or("").to_string();
                entry.values.get_or_insert_with(Vec::new).push(name);
                continue;
            }
            if line.starts_with("    ") {
                continue;
            }
            in_values = false;
        }
        if let Some(t) = line.strip_prefix("- **Type:** ") {
            entry.ty = Some(t.trim().to_string());
        } else if let Some(d) = line.strip_prefix("- **Default:** ") {
            entry.default = Some(d.trim().to_string());
        } else if line.trim_end() == "- **Values:**" {
            in_values = true;
            entry.values.get_or_insert_with(Vec::new);
        } else if !in_fence && !line.trim().is_empty() {
            entry.has_prose = true;
        }
    }
    finish(current.take());
    (entries, duplicates)
}

/// The leading token of a Default line: `required`, `none`, `empty`, or a backticked value;
/// what follows it is explanation.
fn leading_token(cell: &str) -> &str {
    if let Some(rest) = cell.strip_prefix('`') {
        match rest.find('`') {
            Some(end) => &cell[..end + 2],
            None => cell,
        }
    } else {
        cell.split([' ', ',', ';', '(']).next().unwrap_or("")
    }
}

/// Every problem between the doc and the types, one line each.
fn compare(text: &str) -> Vec<String> {
    let fields = type_fields();
    let (entries, duplicates) = doc_entries(text);
    let mut problems: Vec<String> = duplicates
        .into_iter()
        .map(|d| format!("documented twice: {d}"))
        .collect();
    let known: BTreeSet<&str> = fields.iter().map(|(p, _)| p.as_str()).collect();
    for path in entries.keys() {
        if !known.contains(path.as_str()) {
            problems.push(format!(
                "`{path}` (line {}) is documented but no spec type has it",
                entries[path].line
            ));
        }
    }
    for (path, field) in &fields {
        let Some(entry) = entries.get(path) else {
            problems.push(format!(
                "`{path}` is not documented: add a `### `{path}`` entry (type {}, default {})",
                field.ty, field.default
            ));
            continue;
        };
        let at = format!("`{path}` (line {})", entry.line);
        match &entry.ty {
            None => problems.push(format!("{at} has no `- **Type:**` line")),
            Some(t) if *t != field.ty => problems.push(format!(
                "{at}: documented type `{t}`, the types say `{}`",
                field.ty
            )),
            Some(_) => {}
        }
        match &entry.default {
            None => problems.push(format!("{at} has no `- **Default:**` line")),
            Some(d) if leading_token(d) != field.default => problems.push(format!(
                "{at}: documented default {d}, the types say {}",
                field.default
            )),
            Some(_) => {}
        }
        match (&field.variants, &entry.values) {
            (Some(variants), Some(values)) => {
                let want: Vec<String> = variants.iter().map(|v| v.to_string()).collect();
                for v in &want {
                    if !values.contains(v) {
                        problems.push(format!("{at}: value `{v}` is not documented"));
                    }
                }
                for v in values {
                    if !want.contains(v) {
                        problems.push(format!("{at}: documents value `{v}`, which does not exist"));
                    }
                }
            }
            (Some(variants), None) => problems.push(format!(
                "{at} is an enum: list its values {variants:?} under `- **Values:**`"
            )),
            (None, Some(_)) => problems.push(format!(
                "{at} has a `- **Values:**` list but is not an enum"
            )),
            (None, None) => {}
        }
        if !entry.has_prose {
            problems.push(format!("{at} says nothing about what the field does"));
        }
    }
    problems
}

fn assert_no_problems(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "docs/spec.md does not match the spec types:\n  - {}",
        problems.join("\n  - ")
    );
}

#[test]
fn every_field_is_documented_as_the_types_define_it() {
    assert_no_problems(&compare(&doc_text()));
}

/// The drift check itself: a doc with an entry removed, an entry for a field that does not
/// exist, a wrong default, a wrong type and an enum value missing is caught, each by its path.
#[test]
fn drift_is_caught() {
    let good = doc_text();
    assert_no_problems(&compare(&good));

    let remove_entry = |text: &str, path: &str| -> String {
        let heading = format!("\n### `{path}`\n");
        let start = text.find(&heading).expect("the entry exists") + 1;
        let end = text[start + heading.len()..]
            .find("\n#")
            .map_or(text.len(), |e| start + heading.len() + e);
        format!("{}{}", &text[..start], &text[end..])
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "a nested field left out",
            remove_entry(&good, "users[].shell"),
            "`users[].shell` is not documented",
        ),
        (
            "a field of an optional struct left out",
            remove_entry(&good, "proxies.direct"),
            "`proxies.direct` is not documented",
        ),
        (
            "a field that does not exist",
            good.replacen(
                "\n### `users[].shell`\n",
                "\n### `users[].home`\n\n- **Type:** string\n- **Default:** none\n\nx\n\n### `users[].shell`\n",
                1,
            ),
            "`users[].home` (line",
        ),
        (
            "a wrong default",
            good.replacen("- **Default:** `/bin/bash`", "- **Default:** `/bin/sh`", 1),
            "`users[].shell` (line",
        ),
        (
            "a wrong type",
            good.replacen(
                "\n### `post[].may_fail`\n\n- **Type:** boolean",
                "\n### `post[].may_fail`\n\n- **Type:** string",
                1,
            ),
            "documented type `string`, the types say `boolean`",
        ),
        (
            "an enum value left out",
            good.replacen("  - `btrfs`", "  - btrfs", 1),
            "value `btrfs` is not documented",
        ),
        (
            "a required field documented with a default",
            good.replacen(
                "\n### `images[].size`\n\n- **Type:** size\n- **Default:** required",
                "\n### `images[].size`\n\n- **Type:** size\n- **Default:** `1GiB`",
                1,
            ),
            "the types say required",
        ),
    ];
    for (what, text, expected) in cases {
        assert_ne!(text, good, "{what}: the case changed nothing");
        let problems = compare(&text);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "{what}: expected a problem containing {expected:?}, got {problems:?}"
        );
    }
}

/// The walker sees what the types say: nested paths through lists and options, serde's names
/// for enum values, required fields and defaults.
#[test]
fn the_walk_reads_the_types() {
    let fields: BTreeMap<String, TypeField> = type_fields().into_iter().collect();
    for path in [
        "name",
        "images[].mount",
        "users[].ssh_authorized_keys",
        "services.enable",
        "post[].may_fail",
        "proxies.direct",
        "repos[].priority",
    ] {
        assert!(
            fields.contains_key(path),
            "{path} missing: {:?}",
            fields.keys()
        );
    }
    assert!(!fields.contains_key("base_dir"), "base_dir is not YAML");
    assert_eq!(fields["version"].default, "required");
    assert_eq!(fields["images[].size"].ty, "size");
    assert_eq!(fields["arch"].default, "`amd64`");
    assert_eq!(fields["kind"].default, "`fs-images`");
    assert_eq!(fields["proxies"].default, "none");
    assert_eq!(fields["services"].default, "empty");
    assert_eq!(fields["records"].ty, "list of enums");
    assert_eq!(
        fields["records"].variants.as_deref(),
        Some(&["packages", "files", "licenses"][..])
    );
    assert_eq!(
        fields["kind"].variants.as_deref(),
        Some(&["fs-images", "tarball", "disk"][..])
    );
}

// ---------------------------------------------------------------------------------------------
// Example specs, the doc's own examples, and the other tables.

fn example_files() -> Vec<PathBuf> {
    let dir = repo_path("data/examples");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    out.sort();
    out
}

#[test]
fn example_specs_are_valid() {
    let files = example_files();
    assert!(!files.is_empty(), "no example specs in data/examples");
    let mut problems = Vec::new();
    for f in &files {
        if let Err(e) = Spec::from_file(f) {
            problems.push(e.to_string());
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The doc lists every example spec, and only ones that exist.
#[test]
fn doc_lists_the_example_specs() {
    let text = doc_text();
    let on_disk: BTreeSet<String> = example_files()
        .iter()
        .map(|p| format!("data/examples/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    let mentioned: BTreeSet<String> = text
        .split('`')
        .filter(|s| s.starts_with("data/examples/") && s.ends_with(".yaml"))
        .map(String::from)
        .collect();
    let missing: Vec<_> = on_disk.difference(&mentioned).collect();
    let stale: Vec<_> = mentioned.difference(&on_disk).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/spec.md: examples not mentioned {missing:?}, mentioned but missing {stale:?}"
    );
}

/// Every ```yaml block of the doc is a valid spec (with `version:`) or a fragment of one
/// (merged into a small spec first). `@BUILD_ID@` is replaced as `--release` would.
#[test]
fn doc_yaml_blocks_are_valid() {
    let text = doc_text();
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim_start() == "```yaml" => current = Some((i + 1, String::new())),
            None => {}
            Some(_) if line.trim_start() == "```" => blocks.push(current.take().unwrap()),
            Some((_, block)) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(blocks.len() >= 3, "expected yaml examples in docs/spec.md");
    let mut problems = Vec::new();
    for (line, block) in blocks {
        let block = block.replace("@BUILD_ID@", "7");
        let yaml = if block.lines().any(|l| l.starts_with("version:")) {
            block
        } else {
            let fragment: serde_json::Value = match serde_saphyr::from_str(&block) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("block at line {line}: {e}"));
                    continue;
                }
            };
            let mut spec = serde_json::json!({"version": 1, "name": "doc", "suite": "bookworm"});
            let tarball = fragment.get("kind").is_some_and(|k| k == "tarball");
            if fragment.get("images").is_none() && !tarball {
                spec["images"] = serde_json::json!([{"mount": "/", "fs": "ext4", "size": "1GiB"}]);
            }
            for (k, v) in fragment.as_object().expect("a fragment is a mapping") {
                spec[k] = v.clone();
            }
            spec.to_string()
        };
        if let Err(e) = Spec::from_yaml(&yaml, &format!("docs/spec.md line {line}")) {
            problems.push(e.to_string());
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The rows of docs/spec.md's tables whose first cell is backticked, as (first, other cells).
fn table_rows(text: &str) -> Vec<(String, Vec<String>)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| {
            let (first, rest) = l.split_once('`')?;
            let cells = rest
                .trim()
                .trim_start_matches('|')
                .trim_end_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect();
            Some((first.to_string(), cells))
        })
        .collect()
}

/// The environment table lists exactly what a post script sees: debimg's variables (per
/// image with `<i>`) and the clean base environment.
#[test]
fn post_script_environment_is_documented() {
    let fs = debimg::kind::FsInfo {
        mount: "/".into(),
        fs: "ext4".into(),
        label: None,
        size: 1,
        uuid: "u".into(),
        device: "/dev/loop0".into(),
    };
    let mut want: BTreeSet<String> = debimg::post::environment("/", "x", true, &[fs])
        .into_iter()
        .map(|(k, _)| k.replace("_0_", "_<i>_"))
        .collect();
    want.extend(
        debimg::debian::CHROOT_ENV
            .iter()
            .map(|(k, _)| k.to_string()),
    );
    let documented: BTreeSet<String> = table_rows(&doc_text())
        .into_iter()
        .map(|(first, _)| first)
        .filter(|f| {
            f.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_<>i".contains(c))
        })
        .collect();
    assert_eq!(
        documented, want,
        "docs/spec.md's post-script environment table"
    );
}

/// The filesystem table's limits are the ones validation applies.
#[test]
fn filesystem_limits_are_documented() {
    let rows: BTreeMap<String, Vec<String>> = table_rows(&doc_text()).into_iter().collect();
    let fields: BTreeMap<String, TypeField> = type_fields().into_iter().collect();
    let names = fields["images[].fs"]
        .variants
        .clone()
        .expect("fs is an enum");
    for name in names {
        let fs: debimg::spec::Fs = serde_json::from_value(serde_json::json!(name)).unwrap();
        let row = rows
            .get(name)
            .unwrap_or_else(|| panic!("docs/spec.md: no row for `{name}` in the filesystem table"));
        assert_eq!(
            row.first().map(String::as_str),
            Some(debimg::spec::Size(fs.min_size()).to_string().as_str()),
            "smallest size of {name}"
        );
        assert_eq!(
            row.get(1).map(String::as_str),
            Some(fs.max_label_len().to_string().as_str()),
            "longest label of {name}"
        );
    }
}

/// The `locale` entry names every locale glibc has built in (no `locales` package added).
#[test]
fn builtin_locales_are_documented() {
    let text = doc_text();
    let (entries, _) = doc_entries(&text);
    let start = entries["locale"].line;
    let entry: String = text
        .lines()
        .skip(start)
        .take_while(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for l in debimg::debian::settings::BUILTIN_LOCALES {
        assert!(
            entry.contains(&format!("`{l}`")),
            "docs/spec.md's `locale` entry does not name the built-in locale `{l}`"
        );
    }
}
