import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    globalSetup: ["test/harness/global-etcd.ts"],
    // Tests start real etcd and daemon processes, which take seconds on a loaded machine.
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Two cores: more workers only make the real servers compete for them.
    maxWorkers: 2,
  },
});
