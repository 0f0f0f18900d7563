//! The DAG of a job: inputs resolved, cycles refused, schemas checked edge by edge.

use std::collections::HashMap;

use arrow_schema::SchemaRef;
use ledgerflow_schemas::tables::{contribution_schema, kafka_record_schema, missing_columns};

use crate::registry::{Built, Role};
use crate::spec::{did_you_mean, Diagnostic, JobSpec};

/// A checked job in execution order.
pub struct Plan {
    /// Node indices (into `JobSpec::nodes`) in topological order.
    pub order: Vec<usize>,
    /// For each node, the indices of the nodes it feeds.
    pub downstream: Vec<Vec<usize>>,
    /// For each node, its output schema (sinks: their input schema).
    pub schemas: Vec<SchemaRef>,
}

/// Adds every DAG problem of `spec` to `diags`.
pub fn check(spec: &JobSpec, diags: &mut Vec<Diagnostic>) {
    if let Err(mut d) = Plan::new(spec) {
        diags.append(&mut d);
    }
}

impl Plan {
    pub fn new(spec: &JobSpec) -> Result<Plan, Vec<Diagnostic>> {
        let mut diags = Vec::new();
        let d = |pos, key: String, message: String, hint: Option<String>| Diagnostic {
            file: spec.file.clone(),
            pos,
            key,
            message,
            hint,
        };
        let index: HashMap<&str, usize> = spec
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let producers: Vec<&str> = spec
            .nodes
            .iter()
            .filter(|n| n.role != Role::Sink)
            .map(|n| n.name.as_str())
            .collect();
        let n = spec.nodes.len();
        let mut upstream: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut downstream: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, node) in spec.nodes.iter().enumerate() {
            let section = section_of(node.role);
            for (input, pos) in &node.inputs {
                let key = format!("{section}.{}.inputs", node.name);
                match index.get(input.as_str()) {
                    Some(&j) if spec.nodes[j].role == Role::Sink => diags.push(d(
                        *pos,
                        key,
                        format!("`{input}` is a sink; sinks produce nothing to read"),
                        None,
                    )),
                    Some(&j) if j == i => diags.push(d(
                        *pos,
                        key,
                        format!("`{input}` reads its own output"),
                        None,
                    )),
                    Some(&j) => {
                        upstream[i].push(j);
                        downstream[j].push(i);
                    }
                    None => diags.push(d(
                        *pos,
                        key,
                        format!("input `{input}` is not defined"),
                        Some(did_you_mean(input, &producers)),
                    )),
                }
            }
        }
        let sources: Vec<&str> = spec
            .nodes
            .iter()
            .filter(|n| n.role == Role::Source)
            .map(|n| n.name.as_str())
            .collect();
        if sources.len() > 1 {
            let second = spec.nodes.iter().filter(|n| n.role == Role::Source).nth(1);
            diags.push(d(
                second.map(|n| n.pos).unwrap_or_default(),
                format!("sources.{}", sources[1]),
                format!("a job reads one source, this one has {}", sources.len()),
                Some("run one job per source topic; they can write the same Datanet".into()),
            ));
        }

        // A `datanet` source makes a batch job: only batch stages and sinks, and no streaming
        // node takes their rows.
        if let Some(src) = spec
            .nodes
            .iter()
            .find(|n| matches!(n.built, Built::DatanetSource(_)))
        {
            for node in spec
                .nodes
                .iter()
                .filter(|n| !crate::batch::is_batch(&n.built))
            {
                diags.push(d(
                    node.pos,
                    format!("{}.{}", section_of(node.role), node.name),
                    format!(
                        "`{}` ({}) cannot run in a batch job: the source `{}` is a datanet",
                        node.name, node.kind, src.name
                    ),
                    Some("a batch job is a `datanet` source, then `tokenize` and a `token_index` sink, or `train` stages and a `serve` sink".into()),
                ));
            }
        } else {
            for node in spec
                .nodes
                .iter()
                .filter(|n| crate::batch::is_batch(&n.built))
            {
                diags.push(d(
                    node.pos,
                    format!("{}.{}", section_of(node.role), node.name),
                    format!(
                        "`{}` ({}) runs in batch jobs only, whose source is a `datanet`",
                        node.name, node.kind
                    ),
                    Some("index committed data with a separate job (see jobs/index.yaml)".into()),
                ));
            }
        }

        // Kahn's algorithm; what is left over sits on a cycle.
        let mut indegree: Vec<usize> = upstream.iter().map(Vec::len).collect();
        let mut ready: Vec<usize> = (0..n).filter(|&i| indegree[i] == 0).rev().collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop() {
            order.push(i);
            for &j in downstream[i].iter().rev() {
                indegree[j] -= 1;
                if indegree[j] == 0 {
                    ready.push(j);
                }
            }
        }
        if order.len() < n {
            let on_cycle: Vec<&str> = (0..n)
                .filter(|&i| indegree[i] > 0)
                .map(|i| spec.nodes[i].name.as_str())
                .collect();
            let first = (0..n).find(|&i| indegree[i] > 0).unwrap_or(0);
            diags.push(d(
                spec.nodes[first].pos,
                format!(
                    "{}.{}.inputs",
                    section_of(spec.nodes[first].role),
                    spec.nodes[first].name
                ),
                format!("the inputs form a cycle through {}", on_cycle.join(" → ")),
                Some("a job is a DAG: remove one of these inputs".into()),
            ));
            return Err(diags);
        }
        for (i, node) in spec.nodes.iter().enumerate() {
            if node.role != Role::Sink && downstream[i].is_empty() {
                diags.push(d(
                    node.pos,
                    format!("{}.{}", section_of(node.role), node.name),
                    format!("nothing reads `{}`; its rows would be dropped", node.name),
                    Some("add it to the `inputs` of a stage or sink".into()),
                ));
            }
        }

        // Schemas, in order.
        let mut schemas: Vec<Option<SchemaRef>> = vec![None; n];
        for &i in &order {
            let node = &spec.nodes[i];
            let inputs: Option<Vec<SchemaRef>> =
                upstream[i].iter().map(|&j| schemas[j].clone()).collect();
            let Some(inputs) = inputs else { continue };
            let key = format!("{}.{}.inputs", section_of(node.role), node.name);
            let result = match &node.built {
                Built::Kafka(_) => Ok(kafka_record_schema()),
                Built::DatanetSource(_) => Ok(contribution_schema()),
                Built::Tokenize(_) => requires(
                    &contribution_schema(),
                    &inputs,
                    "`tokenize` takes Datanet rows (from a `datanet` source)",
                )
                .map(|()| crate::batch::tokenized_schema()),
                Built::TokenIndex(_) => {
                    let want = crate::batch::tokenized_schema();
                    requires(
                        &want,
                        &inputs,
                        "a token_index sink takes token rows (from `tokenize`)",
                    )
                    .map(|()| want)
                }
                Built::Train(_) => {
                    let model = ledgerflow_schemas::tables::model_schema();
                    let from_datanet = requires(&contribution_schema(), &inputs, "");
                    let from_model = requires(&model, &inputs, "");
                    if inputs.len() == 1 && (from_datanet.is_ok() || from_model.is_ok()) {
                        Ok(model)
                    } else {
                        Err("`train` takes one input: a `datanet` source (a base model) or another `train` stage (an adapter of its model)".to_string())
                    }
                }
                Built::Serve(_) => requires(
                    &ledgerflow_schemas::tables::model_schema(),
                    &inputs,
                    "a serve sink takes models (from `train` stages)",
                )
                .map(|()| ledgerflow_schemas::tables::model_schema()),
                Built::Stage(f) => f.output_schema(&inputs),
                Built::Datanet(c) => {
                    let want = c.input_schema();
                    requires(
                        &want,
                        &inputs,
                        "a datanet sink takes contribution rows (e.g. from `decode_contributions`)",
                    )
                    .map(|()| want)
                }
            };
            match result {
                Ok(s) => schemas[i] = Some(s),
                Err(e) => diags.push(d(
                    node.inputs.first().map(|(_, p)| *p).unwrap_or(node.pos),
                    key,
                    format!("schema mismatch: {e}"),
                    None,
                )),
            }
        }
        if !diags.is_empty() {
            return Err(diags);
        }
        Ok(Plan {
            order,
            downstream,
            schemas: schemas
                .into_iter()
                .map(|s| s.expect("every node typed"))
                .collect(),
        })
    }
}

/// Whether every input has the columns of `want`; else `what` and the problems.
fn requires(want: &SchemaRef, inputs: &[SchemaRef], what: &str) -> Result<(), String> {
    let problems: Vec<String> = inputs
        .iter()
        .flat_map(|s| missing_columns(want, s))
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{what}: {}", problems.join("; ")))
    }
}

fn section_of(role: Role) -> &'static str {
    match role {
        Role::Source => "sources",
        Role::Stage => "stages",
        Role::Sink => "sinks",
    }
}
