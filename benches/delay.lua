-- wrk script for paced load (benches/soak.sh): the chat request of post.lua,
-- each connection waiting DELAY_MS (integer, default 5) between requests.
dofile("benches/post.lua")
local pause = tonumber(os.getenv("DELAY_MS") or "5")
function delay()
  return pause
end
