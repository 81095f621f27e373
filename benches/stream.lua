-- wrk script: a streamed OpenAI chat request (no gateway key: the bench
-- routes are open).
wrk.method = "POST"
wrk.body = '{"model":"m","stream":true,"messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
