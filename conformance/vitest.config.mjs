// One test file, run in one worker: the suite talks to one server and some of its tests
// (concurrent writers, long-poll timing) are sensitive to being run beside others.
import { defineConfig } from "vitest/config"

export default defineConfig({
  test: {
    include: ["conformance.test.mjs"],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    fileParallelism: false,
    reporters: ["default"],
  },
})
