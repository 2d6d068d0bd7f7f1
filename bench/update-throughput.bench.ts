import { Etcd3 } from "etcd3";
import { afterAll, beforeAll, describe, expect, inject, it } from "vitest";
import { etcdConfigYaml, startInProcessDaemon, uniquePrefix, type InProcessDaemon } from "../test/harness/in-process-daemon.js";
import { StateClient } from "../test/harness/state-client.js";

const updatesPerClient = 100;
let daemons: InProcessDaemon[] = [];
let etcd: Etcd3;

beforeAll(async () => {
  const prefix = uniquePrefix("bench-updates");
  for (let index = 0; index < 2; index++) {
    daemons.push(await startInProcessDaemon(etcdConfigYaml(inject("etcdEndpoint"), "immediate", { prefix })));
  }
  etcd = new Etcd3({ hosts: inject("etcdEndpoint") });
});

afterAll(async () => {
  etcd.close();
  await Promise.all(daemons.map((running) => running.stop()));
  daemons = [];
});

async function etcdRevision(): Promise<bigint> {
  const response = await etcd.kv.range({ key: Buffer.from("bench-revision-probe") });
  return BigInt(response.header.revision);
}

function percentile(sorted: number[], fraction: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * fraction))]!;
}

describe("UpdateState under the immediate policy", () => {
  it.each([1, 8, 32, 128])("measures %i concurrent routers across two daemons", async (routers) => {
    const clients = Array.from({ length: routers }, (_, index) => new StateClient(daemons[index % 2]!.daemon.address));
    const latenciesMs: number[] = [];
    const revisionBefore = await etcdRevision();
    const startedAt = performance.now();

    await Promise.all(
      clients.map(async (client, index) => {
        for (let step = 0; step < updatesPerClient; step++) {
          const sentAt = performance.now();
          await client.updateState({
            models: [{ id: `model-${index % 16}`, add: { tokensUsed: 100n, costAccumulated: 0.01 } }],
          });
          latenciesMs.push(performance.now() - sentAt);
        }
      }),
    );
    const elapsedMs = performance.now() - startedAt;
    const transactions = Number((await etcdRevision()) - revisionBefore);
    clients.forEach((client) => client.close());

    const updates = routers * updatesPerClient;
    const sorted = latenciesMs.sort((a, b) => a - b);
    console.log(
      `${routers} routers, ${updates} updates: ${Math.round((updates / elapsedMs) * 1000)} updates/s, ` +
        `latency p50 ${percentile(sorted, 0.5).toFixed(1)} ms, p99 ${percentile(sorted, 0.99).toFixed(1)} ms, ` +
        `${transactions} etcd revisions (${(updates / Math.max(transactions, 1)).toFixed(1)} updates per revision)`,
    );
    expect(latenciesMs).toHaveLength(updates);
  });
});
