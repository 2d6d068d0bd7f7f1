import { defineConfig } from "vitest/config";

/** Benchmarks: they print figures and assert no timings, so they are kept out of the test suite. */
export default defineConfig({
  test: {
    include: ["bench/**/*.bench.ts"],
    globalSetup: ["test/harness/global-etcd.ts"],
    testTimeout: 600_000,
    hookTimeout: 60_000,
    fileParallelism: false,
  },
});
