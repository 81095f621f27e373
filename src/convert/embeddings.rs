//! Embeddings: OpenAI `/v1/embeddings` ⇄ Gemini `:embedContent` /
//! `:batchEmbedContents` (Anthropic has no embeddings API). Batch order is
//! kept; `dimensions` ⇄ `outputDimensionality`; OpenAI's `base64` encoding
//! (what the OpenAI SDKs ask for by default) is little-endian f32.

use super::{ConvertError, opt_str, opt_u64};
use base64::Engine;
use serde_json::{Value, json};

/// Texts to embed and the options, whatever format they came in.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedRequest {
    pub model: String,
    pub inputs: Vec<String>,
    pub dimensions: Option<u64>,
    /// The client wants OpenAI's base64 vectors.
    pub base64: bool,
    /// A Gemini client asked `:embedContent` (one vector back, not a list).
    pub single: bool,
}

fn invalid(what: &str) -> ConvertError {
    ConvertError::Invalid(what.to_string())
}

pub fn decode_openai(body: &Value) -> Result<EmbedRequest, ConvertError> {
    let inputs = match body.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().filter_map(Value::as_str).map(str::to_string).collect()
        }
        Some(Value::Array(_)) => {
            return Err(ConvertError::Refused(
                "token-array embedding inputs cannot be converted; send text".into(),
            ));
        }
        _ => return Err(invalid("input must be a string or a list of strings")),
    };
    Ok(EmbedRequest {
        model: opt_str(body, "model").unwrap_or_default().to_string(),
        inputs,
        dimensions: opt_u64(body, "dimensions"),
        base64: opt_str(body, "encoding_format") == Some("base64"),
        single: false,
    })
}

fn text_of_content(c: &Value) -> String {
    c.get("parts")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| opt_str(p, "text"))
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

/// `:embedContent` (`single`) or `:batchEmbedContents`.
pub fn decode_gemini(body: &Value, model: &str, single: bool) -> Result<EmbedRequest, ConvertError> {
    let dims = |v: &Value| {
        v.get("outputDimensionality")
            .or_else(|| v.get("output_dimensionality"))
            .and_then(Value::as_u64)
    };
    let (inputs, dimensions) = if single {
        let c = body.get("content").ok_or_else(|| invalid("content is required"))?;
        (vec![text_of_content(c)], dims(body))
    } else {
        let reqs = body
            .get("requests")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("requests must be a list"))?;
        let inputs = reqs
            .iter()
            .map(|r| r.get("content").map(text_of_content).unwrap_or_default())
            .collect();
        (inputs, reqs.first().and_then(dims))
    };
    Ok(EmbedRequest {
        model: model.to_string(),
        inputs,
        dimensions,
        base64: false,
        single,
    })
}

pub fn encode_openai(r: &EmbedRequest) -> Value {
    let mut v = json!({"model": r.model, "input": r.inputs, "encoding_format": "float"});
    if let Some(d) = r.dimensions {
        v["dimensions"] = d.into();
    }
    v
}

/// Always the batch endpoint toward Gemini (one call for any count).
pub fn encode_gemini(r: &EmbedRequest) -> Value {
    let requests: Vec<Value> = r
        .inputs
        .iter()
        .map(|t| {
            let mut q = json!({"model": format!("models/{}", r.model), "content": {"parts": [{"text": t}]}});
            if let Some(d) = r.dimensions {
                q["outputDimensionality"] = d.into();
            }
            q
        })
        .collect();
    json!({"requests": requests})
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// Vectors, in input order, from an upstream answer.
pub fn vectors_from_openai(body: &Value) -> Result<Vec<Vec<f64>>, ConvertError> {
    let mut data: Vec<(u64, Vec<f64>)> = body
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("an embeddings answer without data"))?
        .iter()
        .map(|d| {
            (
                opt_u64(d, "index").unwrap_or(0),
                floats(d.get("embedding").unwrap_or(&Value::Null)),
            )
        })
        .collect();
    data.sort_by_key(|(i, _)| *i);
    Ok(data.into_iter().map(|(_, v)| v).collect())
}

pub fn vectors_from_gemini(body: &Value) -> Result<Vec<Vec<f64>>, ConvertError> {
    if let Some(e) = body.get("embedding") {
        return Ok(vec![floats(e.get("values").unwrap_or(&Value::Null))]);
    }
    Ok(body
        .get("embeddings")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("an embeddings answer without embeddings"))?
        .iter()
        .map(|e| floats(e.get("values").unwrap_or(&Value::Null)))
        .collect())
}

pub fn answer_openai(r: &EmbedRequest, vectors: &[Vec<f64>]) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if r.base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({"object": "list", "data": data, "model": r.model, "usage": {"prompt_tokens": 0, "total_tokens": 0}})
}

pub fn answer_gemini(r: &EmbedRequest, vectors: &[Vec<f64>]) -> Value {
    if r.single {
        return json!({"embedding": {"values": vectors.first().cloned().unwrap_or_default()}});
    }
    json!({"embeddings": vectors.iter().map(|v| json!({"values": v})).collect::<Vec<_>>()})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_to_gemini_and_back_keeps_order_and_dimensions() {
        let r = decode_openai(
            &json!({"model": "text-embedding-004", "input": ["a", "b"], "dimensions": 3, "encoding_format": "base64"}),
        )
        .unwrap();
        let g = encode_gemini(&r);
        assert_eq!(g["requests"][1]["content"]["parts"][0]["text"], "b");
        assert_eq!(g["requests"][0]["outputDimensionality"], 3);
        assert_eq!(g["requests"][0]["model"], "models/text-embedding-004");
        let vectors =
            vectors_from_gemini(&json!({"embeddings": [{"values": [1.0, 0.5, 0.0]}, {"values": [0.0, 1.0, 0.25]}]}))
                .unwrap();
        let out = answer_openai(&r, &vectors);
        let b64 = out["data"][1]["embedding"].as_str().unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        let back: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(back, vec![0.0, 1.0, 0.25]);
        assert_eq!(out["data"][1]["index"], 1);
    }

    #[test]
    fn gemini_single_and_batch_to_openai() {
        let r = decode_gemini(
            &json!({"content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 8}),
            "m",
            true,
        )
        .unwrap();
        assert_eq!(
            encode_openai(&r),
            json!({"model": "m", "input": ["hello"], "encoding_format": "float", "dimensions": 8})
        );
        let vectors = vectors_from_openai(&json!({"data": [{"index": 0, "embedding": [0.5]}]})).unwrap();
        assert_eq!(answer_gemini(&r, &vectors), json!({"embedding": {"values": [0.5]}}));
        let r = decode_gemini(
            &json!({"requests": [{"content": {"parts": [{"text": "x"}]}}, {"content": {"parts": [{"text": "y"}]}}]}),
            "m",
            false,
        )
        .unwrap();
        assert_eq!(r.inputs, vec!["x", "y"]);
        // Answers out of order are put back in input order.
        let vectors =
            vectors_from_openai(&json!({"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]}))
                .unwrap();
        assert_eq!(
            answer_gemini(&r, &vectors),
            json!({"embeddings": [{"values": [1.0]}, {"values": [2.0]}]})
        );
        assert!(matches!(
            decode_openai(&json!({"input": [[1, 2]]})),
            Err(ConvertError::Refused(_))
        ));
    }
}
