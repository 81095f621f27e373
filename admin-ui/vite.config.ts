import { defineConfig } from "vitest/config";
import { svelte } from "@sveltejs/vite-plugin-svelte";

// `npm run dev` serves the UI with hot reload and sends API calls to a
// running admin port (FASTGATE_ADMIN, default http://127.0.0.1:9090).
const admin = process.env.FASTGATE_ADMIN ?? "http://127.0.0.1:9090";

export default defineConfig({
  plugins: [svelte()],
  base: "/",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
    // One small app: keep it in one script and one stylesheet.
    chunkSizeWarningLimit: 200,
  },
  server: {
    proxy: {
      "/api": { target: admin, changeOrigin: false },
      "/health": admin,
      "/metrics": admin,
    },
  },
  // Component tests run the browser build of Svelte in jsdom.
  resolve: process.env.VITEST ? { conditions: ["browser"] } : undefined,
  test: {
    environment: "jsdom",
    include: ["src/**/*.test.ts"],
    setupFiles: ["src/test-setup.ts"],
  },
});
