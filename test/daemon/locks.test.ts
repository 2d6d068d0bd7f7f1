import { create, equals } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { Etcd3 } from "etcd3";
import { afterEach, describe, expect, inject, it } from "vitest";
import { SystemStateSchema } from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { etcdConfigYaml, startInProcessDaemon, uniquePrefix, type InProcessDaemon } from "../harness/in-process-daemon.js";
import { expectCallError, StateClient } from "../harness/state-client.js";

const started: InProcessDaemon[] = [];

afterEach(async () => {
  await Promise.all(started.splice(0).map((running) => running.stop()));
});

/**
 * Starts daemons sharing one etcd prefix. Their queue re-check interval is a
 * minute, so a waiter granted sooner was woken by its watch, not by polling.
 */
async function startDaemons(count: number, policy = "immediate"): Promise<{ prefix: string; daemons: InProcessDaemon[] }> {
  const prefix = uniquePrefix("locks");
  const daemons: InProcessDaemon[] = [];
  const storageLines = ["  locking: { retry_interval: 1m }"];
  for (let index = 0; index < count; index++) {
    const running = await startInProcessDaemon(etcdConfigYaml(inject("etcdEndpoint"), policy, { prefix, storageLines }));
    started.push(running);
    daemons.push(running);
  }
  return { prefix, daemons };
}

async function countLockKeys(prefix: string): Promise<number> {
  const client = new Etcd3({ hosts: inject("etcdEndpoint") });
  try {
    return await client.getAll().prefix(`${prefix}/locks/`).count();
  } finally {
    client.close();
  }
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

describe("lock RPCs on etcd", () => {
  it("wakes a waiting acquire on release, not by polling", async () => {
    const { daemons } = await startDaemons(1);
    const client = daemons[0]!.client;
    const delaysMs: number[] = [];

    for (let round = 0; round < 5; round++) {
      const first = (await client.acquireLock({ owner: "router-a" })).lock!;
      const waiting = client.acquireLock({ owner: "router-b", timeout: durationFromMs(10_000) });
      await new Promise((resolve) => setTimeout(resolve, 200));
      expect((await client.describeLock()).waiters).toBe(1);

      await client.releaseLock({ lock: first });
      const releasedAt = performance.now();
      const second = (await waiting).lock!;
      delaysMs.push(performance.now() - releasedAt);
      expect(second.owner).toBe("router-b");
      expect(second.fencingToken).toBeGreaterThan(first.fencingToken);
      await client.releaseLock({ lock: second });
    }
    console.log(`release-to-grant through one daemon, ms: ${delaysMs.map((ms) => ms.toFixed(1)).join(", ")}`);
    // The bound only separates a watch wake-up from the one-minute re-check; bench/ measures the delay.
    expect(median(delaysMs)).toBeLessThan(5000);
  });

  it("answers DEADLINE_EXCEEDED at the timeout and leaves nothing in etcd", async () => {
    const { prefix, daemons } = await startDaemons(1);
    const client = daemons[0]!.client;
    const holder = (await client.acquireLock({ owner: "router-a" })).lock!;

    const startedAt = performance.now();
    const error = await expectCallError(client.acquireLock({ owner: "router-b", timeout: durationFromMs(1500) }));
    const elapsedMs = performance.now() - startedAt;
    expect(error.code).toBe(grpc.status.DEADLINE_EXCEEDED);
    expect(error.details).toContain('lock "state"');
    expect(error.details).toContain("router-a");
    expect(elapsedMs).toBeGreaterThanOrEqual(1500);
    expect(await countLockKeys(prefix)).toBe(1);

    await client.releaseLock({ lock: holder });
    expect(await countLockKeys(prefix)).toBe(0);
  });

  it("replaces a holder that stops refreshing after its ttl", async () => {
    const { daemons } = await startDaemons(1);
    const client = daemons[0]!.client;
    const stale = (await client.acquireLock({ owner: "router-a", ttl: durationFromMs(2000) })).lock!;

    const next = (await client.acquireLock({ owner: "router-b", timeout: durationFromMs(15_000) })).lock!;
    expect(next.owner).toBe("router-b");
    expect(next.fencingToken).toBeGreaterThan(stale.fencingToken);
    const refreshError = await expectCallError(client.refreshLock({ lock: stale }));
    expect(refreshError.code).toBe(grpc.status.FAILED_PRECONDITION);
    const releaseError = await expectCallError(client.releaseLock({ lock: stale }));
    expect(releaseError.code).toBe(grpc.status.FAILED_PRECONDITION);
  });

  it("extends a grant on refresh", async () => {
    const { daemons } = await startDaemons(1);
    const client = daemons[0]!.client;
    const lock = (await client.acquireLock({ owner: "router-a", ttl: durationFromMs(5000) })).lock!;
    await new Promise((resolve) => setTimeout(resolve, 1100));

    const refreshed = (await client.refreshLock({ lock })).lock!;
    expect(refreshed.lockId).toBe(lock.lockId);
    expect(refreshed.fencingToken).toBe(lock.fencingToken);
    expect(timestampDate(refreshed.expiresAt!).getTime()).toBeGreaterThan(timestampDate(lock.expiresAt!).getTime());
  });

  it("refuses a Save with a stale fencing token", async () => {
    const { daemons } = await startDaemons(1);
    const client = daemons[0]!.client;
    const first = (await client.acquireLock({ owner: "router-a" })).lock!;
    await client.save({ state: { models: { m: { tokensUsed: 1n } } }, fence: { token: first.fencingToken } });
    await client.releaseLock({ lock: first });
    const second = (await client.acquireLock({ owner: "router-b" })).lock!;
    await client.save({ state: { models: { m: { tokensUsed: 2n } } }, fence: { token: second.fencingToken } });

    const error = await expectCallError(
      client.save({ state: { models: { m: { tokensUsed: 3n } } }, fence: { token: first.fencingToken } }),
    );
    expect(error.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(error.details).toContain('lock "state"');
    expect(error.details).toContain(String(second.fencingToken));
    expect((await client.load()).state?.models["m"]?.tokensUsed).toBe(2n);
  });

  it("hands one lock between two daemons with growing tokens", async () => {
    const { daemons } = await startDaemons(2);
    const tokens: bigint[] = [];
    for (let round = 0; round < 6; round++) {
      const client = daemons[round % 2]!.client;
      const lock = (await client.acquireLock({ owner: `router-${round % 2}`, timeout: durationFromMs(5000) })).lock!;
      const described = await daemons[(round + 1) % 2]!.client.describeLock();
      expect(described.holder).toBe(`router-${round % 2}`);
      expect(described.fencingToken).toBe(lock.fencingToken);
      tokens.push(lock.fencingToken);
      await client.releaseLock({ lock });
    }
    for (let index = 1; index < tokens.length; index++) {
      expect(tokens[index]!).toBeGreaterThan(tokens[index - 1]!);
    }
  });

  it("loses no increment from eight clients under the lock", async () => {
    const { daemons } = await startDaemons(1);
    const address = daemons[0]!.daemon.address;
    await daemons[0]!.client.save({ state: { models: { counter: { tokensUsed: 0n } } } });
    const incrementsPerClient = 5;

    const clients = Array.from({ length: 8 }, (_, index) => ({ index, client: new StateClient(address) }));
    await Promise.all(
      clients.map(async ({ index, client }) => {
        for (let step = 0; step < incrementsPerClient; step++) {
          const lock = (await client.acquireLock({ owner: `router-${index}`, timeout: durationFromMs(30_000) })).lock!;
          const current = (await client.load()).state!;
          const counter = current.models["counter"]!;
          counter.tokensUsed += 1n;
          await client.save({ state: current, fence: { token: lock.fencingToken } });
          await client.releaseLock({ lock });
        }
      }),
    );
    clients.forEach(({ client }) => client.close());

    const final = (await daemons[0]!.client.load()).state!;
    expect(final.models["counter"]?.tokensUsed).toBe(BigInt(8 * incrementsPerClient));
  });

  it("rejects bad lock requests with INVALID_ARGUMENT", async () => {
    const { daemons } = await startDaemons(1);
    const client = daemons[0]!.client;
    const cases = [
      { request: { owner: "" }, field: "AcquireLockRequest.owner" },
      { request: { owner: "a", ttl: durationFromMs(-5) }, field: "AcquireLockRequest.ttl" },
      { request: { owner: "a", name: "bad\nname" }, field: "AcquireLockRequest.name" },
    ];
    for (const { request, field } of cases) {
      const error = await expectCallError(client.acquireLock(request));
      expect(error.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(error.details).toContain(field);
    }
    const release = await expectCallError(client.releaseLock({}));
    expect(release.code).toBe(grpc.status.INVALID_ARGUMENT);
  });

  it("ends a waiting acquire when the client cancels, leaving nothing queued", async () => {
    const { prefix, daemons } = await startDaemons(1);
    const client = daemons[0]!.client;
    const holder = (await client.acquireLock({ owner: "router-a" })).lock!;

    const error = await expectCallError(client.acquireLock({ owner: "router-b" }, { deadline: Date.now() + 500 }));
    expect(error.code).toBe(grpc.status.DEADLINE_EXCEEDED);
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(await countLockKeys(prefix)).toBe(1);
    expect((await client.describeLock()).waiters).toBe(0);
    await client.releaseLock({ lock: holder });
  });
});

describe("fenced Save on other connectors", () => {
  it("refuses a stale token on the memory connector", async () => {
    const running = await startInProcessDaemon("storage:\n  connector: modelmesh.memory.v1\n  persistence: { sync_policy: immediate }\n");
    started.push(running);
    const client = running.client;
    const first = (await client.acquireLock({ owner: "a" })).lock!;
    await client.releaseLock({ lock: first });
    const second = (await client.acquireLock({ owner: "b" })).lock!;
    const state = create(SystemStateSchema, { models: { m: { tokensUsed: 5n } } });
    await client.save({ state, fence: { token: second.fencingToken } });

    const error = await expectCallError(client.save({ state: {}, fence: { token: first.fencingToken } }));
    expect(error.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(equals(SystemStateSchema, (await client.load()).state!, state)).toBe(true);
  });
});
