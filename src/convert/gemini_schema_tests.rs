//! The Gemini `parameters` sanitizer on real tool definitions (Claude
//! Code's, an MCP server's) and on hostile schemas.

use super::sanitize_schema;
use serde_json::{Value, json};

fn tools() -> Vec<Value> {
    let v: Value = serde_json::from_str(include_str!("../../tests/fixtures/conversion/claude_code_tools.json"))
        .expect("fixture is JSON");
    v["tools"].as_array().expect("tools").clone()
}

fn tool(name: &str) -> Value {
    let t = tools().into_iter().find(|t| t["name"] == name).expect("tool");
    sanitize_schema(&t["input_schema"])
}

/// Every key Gemini's `Schema` does not know, anywhere in `v`.
fn unknown_keys(v: &Value, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, child) in m {
            if k == "properties" {
                for s in child.as_object().into_iter().flatten().map(|(_, s)| s) {
                    unknown_keys(s, out);
                }
                continue;
            }
            if !super::SCHEMA_KEYS.contains(&k.as_str()) {
                out.push(k.clone());
            }
            match child {
                Value::Array(a) => a.iter().for_each(|c| unknown_keys(c, out)),
                c @ Value::Object(_) => unknown_keys(c, out),
                _ => {}
            }
        }
    }
}

#[test]
fn webfetch_keeps_the_uri_meaning_in_the_description() {
    let s = tool("WebFetch");
    let url = &s["properties"]["url"];
    assert_eq!(url["type"], "string");
    assert!(url.get("format").is_none(), "Gemini refuses format uri: {s}");
    assert_eq!(url["description"], "The URL to fetch content from (format: uri)");
    assert_eq!(s["required"], json!(["url", "prompt"]));
    assert!(s.get("$schema").is_none() && s.get("additionalProperties").is_none());
}

#[test]
fn every_claude_code_tool_sanitizes_to_gemini_keywords_only() {
    for t in tools() {
        let s = sanitize_schema(&t["input_schema"]);
        let mut bad = Vec::new();
        unknown_keys(&s, &mut bad);
        assert!(bad.is_empty(), "{}: {bad:?} in {s}", t["name"]);
        assert_eq!(s["type"], "object", "{}", t["name"]);
    }
    let todo = tool("TodoWrite");
    let item = &todo["properties"]["todos"]["items"];
    assert_eq!(
        item["properties"]["status"]["enum"],
        json!(["pending", "in_progress", "completed"])
    );
    assert_eq!(item["properties"]["content"]["minLength"], 1);
}

#[test]
fn refs_resolve_maps_stay_described_and_recursion_is_bounded() {
    let s = tool("mcp__tracker__create_issue");
    // $ref into $defs: the Link object itself, never {}.
    let link = &s["properties"]["links"]["items"];
    assert_eq!(link["type"], "object", "{s}");
    assert_eq!(link["properties"]["url"]["description"], "(format: uri)");
    assert_eq!(link["required"], json!(["url"]));
    // A map: an object whose value schema is in the description.
    let labels = &s["properties"]["labels"];
    assert_eq!(labels["type"], "object");
    let d = labels["description"].as_str().unwrap_or_default();
    assert!(
        d.starts_with("Label values by label name (") && d.contains(r#""type":"string""#),
        "{d}"
    );
    // A recursive type: expanded twice, then a described stub of its type.
    let plan = &s["properties"]["plan"];
    assert_eq!(plan["properties"]["name"]["type"], "string");
    let level2 = &plan["properties"]["subtasks"]["items"];
    assert_eq!(level2["type"], "object");
    let stub = &level2["properties"]["subtasks"]["items"];
    assert_eq!(stub["type"], "object", "{plan}");
    assert!(
        stub["description"]
            .as_str()
            .unwrap_or_default()
            .contains("recursive #/$defs/Task"),
        "{stub}"
    );
    assert!(stub.get("properties").is_none());
    // Formats Gemini takes stay; type lists become nullable / anyOf.
    assert_eq!(
        s["properties"]["due"],
        json!({"type": "string", "format": "date-time", "nullable": true})
    );
    assert_eq!(
        s["properties"]["priority"]["anyOf"],
        json!([{"type": "integer"}, {"type": "string"}])
    );
    // allOf merged; required only names properties.
    assert_eq!(s["properties"]["assignee"]["description"], "(format: email)");
    assert_eq!(s["required"], json!(["title", "assignee"]));
    assert!(s.get("$defs").is_none() && s.get("allOf").is_none());
}

#[test]
fn hostile_schemas_stay_bounded() {
    // A $ref to itself, and one that points nowhere.
    let selfish = json!({"type": "object", "properties": {"me": {"$ref": "#"}, "gone": {"$ref": "#/$defs/Nope"}}});
    let s = sanitize_schema(&selfish);
    assert!(s.to_string().len() < 2_000, "{s}");
    assert_eq!(s["properties"]["gone"]["type"], "object");
    assert!(
        s["properties"]["gone"]["description"]
            .as_str()
            .unwrap_or_default()
            .contains("#/$defs/Nope")
    );
    // A fan-out of refs: each level doubles (2^40 nodes unbounded).
    let mut defs = serde_json::Map::new();
    for i in 0..40 {
        defs.insert(
            format!("D{i}"),
            json!({"type": "object", "properties": {"a": {"$ref": format!("#/$defs/D{}", i + 1)}, "b": {"$ref": format!("#/$defs/D{}", i + 1)}}}),
        );
    }
    defs.insert("D40".into(), json!({"type": "string"}));
    let bomb = json!({"$defs": defs, "$ref": "#/$defs/D0"});
    let started = std::time::Instant::now();
    let s = sanitize_schema(&bomb);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert!(s.to_string().len() < 2_000_000, "{}", s.to_string().len());
    assert_eq!(s["type"], "object");
}
