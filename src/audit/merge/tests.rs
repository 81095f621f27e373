use super::*;

fn merged(spec: Spec, ct: &str, cap: usize, pieces: &[&[u8]]) -> Value {
    let mut m = StreamMerge::new(spec, Some(ct), cap).unwrap();
    for p in pieces {
        m.feed(p);
    }
    let text = m.finish().unwrap();
    assert!(text.len() <= cap, "{} > {cap}", text.len());
    serde_json::from_str(&text).unwrap()
}
