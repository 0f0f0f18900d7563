//! Checks a YAML node against the JSON Schema of a typed config (derived with `schemars`) and
//! converts it to JSON for serde, collecting every problem with its position.

use marked_yaml::Node;
use serde_json::{Map, Value};

use super::interpolate::interpolate;
use super::{Diagnostic, Pos};

/// "did you mean …?" for an unknown name, or the list of valid ones.
pub fn did_you_mean(name: &str, valid: &[&str]) -> String {
    let best = valid
        .iter()
        .map(|v| (strsim::jaro_winkler(name, v), *v))
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((score, v)) if score > 0.8 => format!("did you mean `{v}`?"),
        _ if valid.is_empty() => "nothing is accepted here".to_string(),
        _ => format!("valid: {}", valid.join(", ")),
    }
}

pub struct SchemaChecker<'a> {
    file: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'a> SchemaChecker<'a> {
    pub fn new(file: &'a str, env: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self { file, env }
    }

    pub fn file(&self) -> &str {
        self.file
    }

    /// The property names an object schema allows.
    pub fn property_names<'s>(&self, schema: &'s Value) -> Vec<&'s str> {
        schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default()
    }

    fn diag(&self, pos: Pos, key: &str, message: String, hint: Option<String>) -> Diagnostic {
        Diagnostic {
            file: self.file.to_string(),
            pos,
            key: key.to_string(),
            message,
            hint,
        }
    }

    /// Converts `node` as `root` (a schema with its `$defs`) describes; `None` after an error.
    pub fn convert(
        &self,
        node: &Node,
        root: &Value,
        path: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<Value> {
        self.convert_with(node, root, root, path, diags)
    }

    fn resolve<'s>(&self, schema: &'s Value, root: &'s Value) -> &'s Value {
        let mut s = schema;
        for _ in 0..8 {
            match s.get("$ref").and_then(Value::as_str) {
                Some(r) => {
                    let name = r.rsplit('/').next().unwrap_or(r);
                    match root.get("$defs").and_then(|d| d.get(name)) {
                        Some(t) => s = t,
                        None => return s,
                    }
                }
                None => return s,
            }
        }
        s
    }

    fn types(schema: &Value) -> Vec<&str> {
        match schema.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        }
    }

    /// The allowed string constants of an enum schema (`enum`, or `oneOf` of `const`s).
    fn enum_values(schema: &Value) -> Option<Vec<&str>> {
        if let Some(e) = schema.get("enum").and_then(Value::as_array) {
            return Some(e.iter().filter_map(Value::as_str).collect());
        }
        let variants = schema.get("oneOf").and_then(Value::as_array)?;
        let consts: Vec<&str> = variants
            .iter()
            .filter_map(|v| {
                v.get("const")
                    .and_then(Value::as_str)
                    .or_else(|| v.get("enum")?.as_array()?.first()?.as_str())
            })
            .collect();
        (consts.len() == variants.len()).then_some(consts)
    }

    fn convert_with(
        &self,
        node: &Node,
        schema: &Value,
        root: &Value,
        path: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<Value> {
        let schema = self.resolve(schema, root);
        let pos = Pos::of(node);

        // Option<T>: `anyOf: [T, {type: null}]`.
        if let Some(any) = schema.get("anyOf").and_then(Value::as_array) {
            if is_null(node) && any.iter().any(|s| Self::types(s).contains(&"null")) {
                return Some(Value::Null);
            }
            let non_null: Vec<&Value> = any.iter().filter(|s| Self::types(s) != ["null"]).collect();
            if let [only] = non_null.as_slice() {
                return self.convert_with(node, only, root, path, diags);
            }
        }
        if let Some(values) = Self::enum_values(schema) {
            let s = self.scalar(node, path, diags)?;
            if values.contains(&s.as_str()) {
                return Some(Value::String(s));
            }
            diags.push(self.diag(
                pos,
                path,
                format!("`{s}` is not allowed here"),
                Some(did_you_mean(&s, &values)),
            ));
            return None;
        }
        let types = Self::types(schema);
        if types.contains(&"null") && is_null(node) {
            return Some(Value::Null);
        }
        let want = types.iter().copied().find(|t| *t != "null").unwrap_or("");
        match want {
            "object" => self.convert_object(node, schema, root, path, diags),
            "array" => {
                let Some(seq) = node.as_sequence() else {
                    diags.push(self.diag(
                        pos,
                        path,
                        "expected a list".into(),
                        Some("e.g. `[a, b]`".into()),
                    ));
                    return None;
                };
                let items = schema.get("items").cloned().unwrap_or(Value::Bool(true));
                let mut out = Vec::with_capacity(seq.len());
                let mut ok = true;
                for (i, item) in seq.iter().enumerate() {
                    match self.convert_with(item, &items, root, &format!("{path}[{i}]"), diags) {
                        Some(v) => out.push(v),
                        None => ok = false,
                    }
                }
                ok.then_some(Value::Array(out))
            }
            "string" => self.scalar(node, path, diags).map(Value::String),
            "integer" => {
                let s = self.scalar(node, path, diags)?;
                let min = schema.get("minimum").and_then(Value::as_f64);
                let parsed = s
                    .replace('_', "")
                    .parse::<i64>()
                    .ok()
                    .map(Value::from)
                    .or_else(|| s.replace('_', "").parse::<u64>().ok().map(Value::from));
                match parsed {
                    Some(v) if min.is_none_or(|m| v.as_f64().is_some_and(|x| x >= m)) => Some(v),
                    Some(_) => {
                        diags.push(self.diag(
                            pos,
                            path,
                            format!("`{s}` must not be negative"),
                            None,
                        ));
                        None
                    }
                    None => {
                        diags.push(self.diag(
                            pos,
                            path,
                            format!("expected a whole number, found `{s}`"),
                            None,
                        ));
                        None
                    }
                }
            }
            "number" => {
                let s = self.scalar(node, path, diags)?;
                match s.parse::<f64>() {
                    Ok(f) if f.is_finite() => Some(Value::from(f)),
                    _ => {
                        diags.push(self.diag(
                            pos,
                            path,
                            format!("expected a number, found `{s}`"),
                            None,
                        ));
                        None
                    }
                }
            }
            "boolean" => {
                let s = self.scalar(node, path, diags)?;
                match s.as_str() {
                    "true" => Some(Value::Bool(true)),
                    "false" => Some(Value::Bool(false)),
                    _ => {
                        diags.push(self.diag(
                            pos,
                            path,
                            format!("expected true or false, found `{s}`"),
                            None,
                        ));
                        None
                    }
                }
            }
            _ => Some(to_json(node)),
        }
    }

    fn convert_object(
        &self,
        node: &Node,
        schema: &Value,
        root: &Value,
        path: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<Value> {
        let pos = Pos::of(node);
        let Some(map) = node.as_mapping() else {
            diags.push(self.diag(pos, path, "expected a mapping".into(), None));
            return None;
        };
        let props = schema.get("properties").and_then(Value::as_object);
        let extra = schema.get("additionalProperties");
        let names: Vec<&str> = props
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let mut out = Map::new();
        let mut ok = true;
        for (k, v) in map.iter() {
            let key = k.as_str();
            let kpath = join(path, key);
            let sub = props.and_then(|p| p.get(key)).or(match extra {
                Some(Value::Bool(false)) | None => None,
                Some(s) => Some(s),
            });
            match sub {
                Some(sub) => match self.convert_with(v, sub, root, &kpath, diags) {
                    Some(val) => {
                        out.insert(key.to_string(), val);
                    }
                    None => ok = false,
                },
                None => {
                    let mut valid = names.clone();
                    valid.sort_unstable();
                    diags.push(self.diag(
                        Pos::of_key(k),
                        &kpath,
                        format!("unknown key `{key}`"),
                        Some(did_you_mean(key, &valid)),
                    ));
                    ok = false;
                }
            }
        }
        if let Some(required) = schema.get("required").and_then(Value::as_array) {
            for r in required.iter().filter_map(Value::as_str) {
                if !out.contains_key(r) && !map.iter().any(|(k, _)| k.as_str() == r) {
                    let doc = props
                        .and_then(|p| p.get(r))
                        .map(|s| self.resolve(s, root))
                        .and_then(|s| s.get("description"))
                        .and_then(Value::as_str)
                        .map(|d| d.lines().next().unwrap_or(d).to_string());
                    diags.push(self.diag(
                        pos,
                        &join(path, r),
                        format!("missing required key `{r}`"),
                        doc,
                    ));
                    ok = false;
                }
            }
        }
        ok.then_some(Value::Object(out))
    }

    fn scalar(&self, node: &Node, path: &str, diags: &mut Vec<Diagnostic>) -> Option<String> {
        let Some(s) = node.as_scalar() else {
            diags.push(self.diag(Pos::of(node), path, "expected a single value".into(), None));
            return None;
        };
        match interpolate(s.as_str(), self.env) {
            Ok(v) => Some(v),
            Err(e) => {
                diags.push(self.diag(Pos::of(node), path, e, None));
                None
            }
        }
    }
}

fn is_null(node: &Node) -> bool {
    node.as_scalar()
        .is_some_and(|s| s.may_coerce() && matches!(s.as_str(), "" | "~" | "null"))
}

/// Untyped conversion, for schema positions that accept anything.
fn to_json(node: &Node) -> Value {
    match node {
        Node::Scalar(s) => Value::String(s.as_str().to_string()),
        Node::Sequence(seq) => Value::Array(seq.iter().map(to_json).collect()),
        Node::Mapping(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.as_str().to_string(), to_json(v)))
                .collect(),
        ),
    }
}
