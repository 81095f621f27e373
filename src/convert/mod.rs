//! Conversion between the OpenAI, Anthropic and Gemini wire formats through
//! one internal representation ([`ir`]): each format has a decoder and an
//! encoder (`openai`, `anthropic`, `gemini`), and a request from format A to
//! provider B is `B::encode(A::decode(body))` — never a converter per pair,
//! never two hops through a third format. Same format on both sides never
//! comes here (raw passthrough).
//!
//! Whatever a target cannot express is either dropped and reported
//! ([`Loss`], sent to the client as `x-fastgate-warning`) or, where dropping
//! would change the meaning, refused with [`ConvertError::Refused`] (a 400 in
//! the client's shape). `docs/conversion.md` lists every case.

pub mod anthropic;
pub mod capabilities;
pub mod embeddings;
pub mod errors;
pub mod gemini;
pub mod ir;
pub mod model_id;
pub mod openai;
pub mod responses;
pub mod sse;
pub mod stream;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The client's body is not a valid request of its own format.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The request asks for something the upstream's format cannot do, and
    /// dropping it would change the answer.
    #[error("{0}")]
    Refused(String),
}

/// Gemini's `thoughtSignature` on a function call has no place in OpenAI's
/// or Anthropic's tool calls, yet Gemini wants it back with the call on the
/// next turn (Gemini 3 refuses a call without it). It travels inside the
/// call's id given to such clients, base64url after this mark (ids stay
/// within `[A-Za-z0-9_-]`), and is taken out again when they send it back.
const SIGNATURE_MARK: &str = "__thought__";

/// A tool call's id for an OpenAI or Anthropic client, carrying `signature`.
pub fn id_with_signature(id: &str, signature: Option<&str>) -> String {
    use base64::Engine;
    match signature.filter(|s| !s.is_empty()) {
        Some(sig) => format!(
            "{id}{SIGNATURE_MARK}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig)
        ),
        None => id.to_string(),
    }
}

/// A client's tool call id split into the id and the signature it carries.
pub fn split_signature(id: &str) -> (String, Option<String>) {
    use base64::Engine;
    let Some((plain, encoded)) = id.split_once(SIGNATURE_MARK) else {
        return (id.to_string(), None);
    };
    match base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
    {
        Some(sig) => (plain.to_string(), Some(sig)),
        None => (id.to_string(), None),
    }
}

/// What a conversion left out, in words a client developer understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loss(pub Vec<String>);

impl Loss {
    pub fn dropped(&mut self, what: impl Into<String>) {
        let what = what.into();
        if !self.0.contains(&what) {
            self.0.push(what);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `x-fastgate-warning` header value (ASCII, one line).
    pub fn header_value(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| {
            self.0
                .join("; ")
                .chars()
                .map(|c| if c.is_ascii() && !c.is_ascii_control() { c } else { '?' })
                .collect()
        })
    }
}

/// A `data:` URL's media type and base64 payload.
pub(crate) fn split_data_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media_type = meta.strip_suffix(";base64")?;
    Some((media_type.to_string(), data.to_string()))
}

/// Media given as a `data:` URL (inline) or a plain URL (fetched by the
/// provider), as OpenAI's `image_url`/`file_data` and the Responses API's
/// `input_image`/`input_file` carry them.
pub(crate) fn media_of_url(url: &str) -> ir::Media {
    match split_data_url(url) {
        Some((media_type, data)) => ir::Media::Base64 { media_type, data },
        None => ir::Media::Url {
            url: url.to_string(),
            media_type: None,
        },
    }
}

/// A document part from its data (or URL) and file name; one named only by
/// a file id is dropped with `what` in the loss (the file lives at the
/// client's provider).
pub(crate) fn document_part(
    data: Option<&str>,
    filename: Option<&str>,
    what: &str,
    loss: &mut Loss,
) -> Option<ir::Part> {
    match data {
        Some(data) => Some(ir::Part::Document {
            media: media_of_url(data),
            title: filename.map(str::to_string),
        }),
        None => {
            loss.dropped(format!("{what} by file_id (upload the file to the target provider)"));
            None
        }
    }
}

/// Text of a content value that may be a string or a list of text parts.
pub(crate) fn plain_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

/// Arguments text as a JSON object (an empty or broken string becomes `{}`).
pub(crate) fn arguments_object(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => Value::Object(Default::default()),
    }
}

/// A count the client's API takes as an integer of at least `min`: absent
/// or `null` is `None`; a string, a fraction, a negative or a number past
/// `u64` is refused (as the provider would), never read as absent — a
/// client asking for `"100"` tokens must not be given the default 8,192.
pub(crate) fn count_field(v: &Value, key: &str, min: u64) -> Result<Option<u64>, ConvertError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if n >= min => Ok(Some(n)),
            _ => Err(ConvertError::Invalid(format!(
                "`{key}` must be an integer of at least {min}"
            ))),
        },
    }
}

/// A number the client's API takes within `min..=max` (temperature, top_p,
/// penalties): absent or `null` is `None`, anything else is refused.
pub(crate) fn number_field(v: &Value, key: &str, min: f64, max: f64) -> Result<Option<f64>, ConvertError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_f64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ConvertError::Invalid(format!(
                "`{key}` must be a number from {min} to {max}"
            ))),
        },
    }
}

pub(crate) fn opt_u64(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

pub(crate) fn opt_str<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

#[cfg(test)]
mod tests;
