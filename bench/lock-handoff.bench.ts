import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { etcdConfigYaml, startInProcessDaemon, uniquePrefix, type InProcessDaemon } from "../test/harness/in-process-daemon.js";

const rounds = 50;
const daemons: InProcessDaemon[] = [];

beforeAll(async () => {
  const prefix = uniquePrefix("bench-locks");
  // A one-minute re-check interval makes sure each grant is woken by the watch.
  const storageLines = ["  locking: { retry_interval: 1m }"];
  for (let index = 0; index < 2; index++) {
    daemons.push(await startInProcessDaemon(etcdConfigYaml(inject("etcdEndpoint"), "immediate", { prefix, storageLines })));
  }
});

afterAll(async () => {
  await Promise.all(daemons.map((running) => running.stop()));
});

function percentile(sorted: number[], fraction: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * fraction))]!;
}

describe("lock hand-off", () => {
  it("measures release-to-grant time between two daemons", async () => {
    const [holderDaemon, waiterDaemon] = daemons as [InProcessDaemon, InProcessDaemon];
    const delaysMs: number[] = [];

    for (let round = 0; round < rounds; round++) {
      const held = (await holderDaemon.client.acquireLock({ owner: "bench-holder" })).lock!;
      const waiting = waiterDaemon.client.acquireLock({ owner: "bench-waiter", timeout: durationFromMs(10_000) });
      // Gives the waiter time to queue and start watching before the release.
      await new Promise((resolve) => setTimeout(resolve, 50));

      await holderDaemon.client.releaseLock({ lock: held });
      const releasedAt = performance.now();
      const granted = (await waiting).lock!;
      delaysMs.push(performance.now() - releasedAt);
      await waiterDaemon.client.releaseLock({ lock: granted });
    }

    const sorted = [...delaysMs].sort((a, b) => a - b);
    console.log(
      `release-to-grant across two daemons, ${rounds} rounds: ` +
        `p50 ${percentile(sorted, 0.5).toFixed(1)} ms, p95 ${percentile(sorted, 0.95).toFixed(1)} ms, ` +
        `max ${sorted.at(-1)!.toFixed(1)} ms`,
    );
    expect(delaysMs).toHaveLength(rounds);
  });
});
