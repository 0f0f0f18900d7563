//! The JSON Schema of job files (`schemas/job.schema.json`), assembled from the registry.

use serde_json::{json, Map, Value};

use crate::registry::{registry, Role};
use crate::spec::JobHeader;

fn inline_defs(schema: &mut Value, defs: &mut Map<String, Value>) {
    if let Some(Value::Object(d)) = schema.as_object_mut().and_then(|o| o.remove("$defs")) {
        defs.extend(d);
    }
    if let Some(o) = schema.as_object_mut() {
        o.remove("$schema");
    }
}

/// The schema of a whole job file.
pub fn job_schema() -> Value {
    let mut defs = Map::new();
    let mut header = serde_json::to_value(schemars::schema_for!(JobHeader)).expect("schema");
    inline_defs(&mut header, &mut defs);
    let mut sections: Map<String, Value> = Map::new();
    for (section, role) in [
        ("sources", Role::Source),
        ("stages", Role::Stage),
        ("sinks", Role::Sink),
    ] {
        let mut variants = Vec::new();
        for e in registry().iter().filter(|e| e.role == role) {
            let mut s = serde_json::to_value((e.schema)()).expect("schema");
            inline_defs(&mut s, &mut defs);
            let obj = s.as_object_mut().expect("config schemas are objects");
            let props = obj
                .entry("properties")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("properties");
            props.insert(
                "type".into(),
                json!({"const": e.name, "description": e.doc}),
            );
            if role != Role::Source {
                props.insert(
                    "inputs".into(),
                    json!({"type": "array", "items": {"type": "string"}, "minItems": 1,
                           "description": "Names of the sources or stages this one reads."}),
                );
            }
            let req = obj.entry("required").or_insert_with(|| json!([]));
            if let Some(r) = req.as_array_mut() {
                r.push(json!("type"));
                if role != Role::Source {
                    r.push(json!("inputs"));
                }
            }
            obj.insert("title".into(), json!(e.name));
            obj.insert("additionalProperties".into(), json!(false));
            variants.push(s);
        }
        sections.insert(
            section.into(),
            json!({"type": "object", "additionalProperties": {"oneOf": variants}}),
        );
    }
    let mut root = header;
    let obj = root.as_object_mut().expect("object");
    obj.insert(
        "$schema".into(),
        json!("https://json-schema.org/draft/2020-12/schema"),
    );
    obj.insert("title".into(), json!("ledgerflow job"));
    let props = obj
        .get_mut("properties")
        .and_then(Value::as_object_mut)
        .expect("header properties");
    props.extend(sections);
    obj.insert("$defs".into(), Value::Object(defs));
    root
}
