import { status as GrpcStatus } from "@grpc/grpc-js";
import { noop } from "cockatiel";
import { TcpProxy } from "../harness/tcp-proxy.js";
import { Writable } from "node:stream";
import { Etcd3 } from "etcd3";
import { pino, type Logger } from "pino";
import { afterAll, afterEach, describe, expect, inject, it } from "vitest";
import { EtcdLockService, type EtcdLockServiceOptions } from "../../src/locks/etcd-lock-service.js";
import type { AcquireOptions, LockDescription, LockGrant } from "../../src/locks/lock-service.js";
import { ServiceError } from "../../src/server/service-error.js";
import { EtcdProcess } from "../harness/etcd.js";
import { uniquePrefix, waitFor } from "../harness/in-process-daemon.js";

const silentLogger = pino({ level: process.env["TEST_LOG_LEVEL"] ?? "silent" });

/** Creates an etcd client set up as the daemon sets up its own: one attempt per call and a deadline on each unary call. */
function newClient(endpoint: string, requestTimeoutMs = 5000): Etcd3 {
  return new Etcd3({
    hosts: endpoint,
    defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + requestTimeoutMs }),
    faultHandling: { host: () => noop, global: noop },
  });
}

async function expectServiceError(promise: Promise<unknown>, code: GrpcStatus): Promise<ServiceError> {
  const error: unknown = await promise.then(
    () => undefined,
    (rejection: unknown) => rejection,
  );
  expect(error).toBeInstanceOf(ServiceError);
  expect((error as ServiceError).code, (error as ServiceError).message).toBe(code);
  return error as ServiceError;
}

/** Creates a logger that keeps its JSON lines, so tests can check which paths ran. */
function captureLogger(): { logger: Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(JSON.parse(chunk.toString("utf8")) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level: "debug" }, stream), lines };
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe("EtcdLockService on the shared etcd", () => {
  const endpoint = inject("etcdEndpoint");
  const raw = newClient(endpoint);
  const clients: Etcd3[] = [];
  const services: EtcdLockService[] = [];

  /** Opens a service with a client of its own, as a second daemon would have. */
  async function openService(prefix: string, extra: Partial<EtcdLockServiceOptions> = {}): Promise<EtcdLockService> {
    const client = newClient(endpoint);
    clients.push(client);
    const service = await EtcdLockService.open(
      { client, endpoints: [endpoint], prefix, requestTimeoutMs: 5000, retryIntervalMs: 1000, ...extra },
      silentLogger,
    );
    services.push(service);
    return service;
  }

  function request(name: string, owner: string, extra: Partial<AcquireOptions> = {}): AcquireOptions {
    return { name, owner, ttlMs: 10_000, timeoutMs: 10_000, signal: new AbortController().signal, ...extra };
  }

  async function queueKeys(prefix: string, name: string): Promise<string[]> {
    return await raw.getAll().prefix(`${prefix}/locks/${name}/`).keys();
  }

  /** Waits until `count` callers wait behind the holder of `name`. */
  async function waitForWaiters(service: EtcdLockService, name: string, count: number): Promise<void> {
    await waitFor(async () => (await service.describe(name)).waiters === count, 5000, `${count} waiters on lock "${name}"`);
  }

  /** Returns the lease id (decimal) of the queue key with the highest create revision. */
  async function newestLeaseId(prefix: string, name: string): Promise<string> {
    const response = await raw.kv.range({
      key: Buffer.from(`${prefix}/locks/${name}/`),
      range_end: Buffer.from(`${prefix}/locks/${name}0`),
    });
    const newest = response.kvs.reduce((a, b) => (BigInt(a.create_revision) > BigInt(b.create_revision) ? a : b));
    return newest.lease;
  }

  async function leaseTtl(leaseId: string): Promise<number> {
    return Number((await raw.leaseClient.leaseTimeToLive({ ID: leaseId })).TTL);
  }

  afterEach(async () => {
    await Promise.all(services.splice(0).map((service) => service.close()));
    for (const client of clients.splice(0)) client.close();
  });

  afterAll(() => {
    raw.close();
  });

  it("acquire grants a free lock at once", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);

    const grant = await service.acquire(request("state", "router-1", { ttlMs: 5000 }));

    expect(grant.name).toBe("state");
    expect(grant.owner).toBe("router-1");
    expect(grant.lockId).toMatch(/^[0-9a-f]+$/);
    expect(grant.fencingToken).toBeGreaterThan(0n);
    expect(grant.expiresAt.getTime() - grant.acquiredAt.getTime()).toBeGreaterThanOrEqual(4900);
    expect(grant.expiresAt.getTime() - grant.acquiredAt.getTime()).toBeLessThanOrEqual(5100);
    const keys = await queueKeys(prefix, "state");
    expect(keys).toEqual([`${prefix}/locks/state/${grant.lockId}`]);
  });

  it("acquire rounds the ttl up to whole seconds", async () => {
    const service = await openService(uniquePrefix("locks"));

    const grant = await service.acquire(request("state", "router-1", { ttlMs: 2500 }));

    const grantedMs = grant.expiresAt.getTime() - grant.acquiredAt.getTime();
    expect(grantedMs).toBeGreaterThanOrEqual(2900);
    expect(grantedMs).toBeLessThanOrEqual(3100);
  });

  it("acquire raises a short ttl to etcd's minimum", async () => {
    const service = await openService(uniquePrefix("locks"));

    const grant = await service.acquire(request("state", "router-1", { ttlMs: 500 }));

    // etcd 3.4 with its default 100 ms heartbeat and 1 s election timeout grants at least 2 s.
    const grantedMs = grant.expiresAt.getTime() - grant.acquiredAt.getTime();
    expect(grantedMs).toBeGreaterThanOrEqual(1900);
    expect(grantedMs).toBeLessThanOrEqual(2100);
  });

  it("waiter gets lock within 100 ms of release", async () => {
    const prefix = uniquePrefix("locks");
    const first = await openService(prefix);
    const second = await openService(prefix);
    const measuredMs: number[] = [];

    for (let round = 0; round < 5; round++) {
      const held = await first.acquire(request("state", "router-1"));
      let grantedAt = 0;
      const waiting = second.acquire(request("state", "router-2")).then((grant) => {
        grantedAt = performance.now();
        return grant;
      });
      await waitForWaiters(first, "state", 1);
      // Gives the waiter's watch time to connect, so the measurement covers only the release.
      await sleep(100);
      expect(grantedAt).toBe(0);

      await first.release("state", held.lockId);
      const releasedAt = performance.now();
      const grant = await waiting;
      measuredMs.push(grantedAt - releasedAt);
      expect(grant.fencingToken).toBeGreaterThan(held.fencingToken);
      await second.release("state", grant.lockId);
    }

    console.log(`etcd lock release-to-grant ms: ${measuredMs.map((ms) => ms.toFixed(1)).join(", ")}; median ${median(measuredMs).toFixed(1)}`);
    expect(median(measuredMs)).toBeLessThan(100);
  });

  it("acquire times out naming the holder", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    const held = await service.acquire(request("state", "router-1"));
    const startedAt = performance.now();

    const waiting = service.acquire(request("state", "router-2", { timeoutMs: 1500 }));
    await waitForWaiters(service, "state", 1);
    const waiterLeaseId = await newestLeaseId(prefix, "state");
    const error = await expectServiceError(waiting, GrpcStatus.DEADLINE_EXCEEDED);
    const elapsedMs = performance.now() - startedAt;

    expect(elapsedMs).toBeGreaterThanOrEqual(1500);
    expect(elapsedMs).toBeLessThan(2500);
    expect(error.message).toContain('cannot acquire lock "state": timed out after 1500 ms');
    expect(error.message).toContain(`held by "router-1" (fencing token ${held.fencingToken}) since ${held.acquiredAt.toISOString()}`);
    expect(await queueKeys(prefix, "state")).toEqual([`${prefix}/locks/state/${held.lockId}`]);
    expect(await leaseTtl(waiterLeaseId)).toBe(-1);
  });

  it("acquire with zero timeout never waits", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);

    const held = await service.acquire(request("state", "router-1", { timeoutMs: 0 }));
    const startedAt = performance.now();
    const error = await expectServiceError(service.acquire(request("state", "router-2", { timeoutMs: 0 })), GrpcStatus.DEADLINE_EXCEEDED);

    expect(performance.now() - startedAt).toBeLessThan(500);
    expect(error.message).toContain('held by "router-1"');
    expect(await queueKeys(prefix, "state")).toEqual([`${prefix}/locks/state/${held.lockId}`]);
  });

  it("unrefreshed holder expires after its ttl", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    const first = await service.acquire(request("state", "router-1", { ttlMs: 2000 }));

    const second = await service.acquire(request("state", "router-2", { ttlMs: 2000, timeoutMs: 10_000 }));

    // etcd expires a lease no earlier than its TTL after the last keepalive, which `expiresAt` counts from.
    expect(second.acquiredAt.getTime()).toBeGreaterThanOrEqual(first.expiresAt.getTime() - 50);
    expect(second.acquiredAt.getTime() - first.acquiredAt.getTime()).toBeLessThan(4000);
    expect(second.fencingToken).toBeGreaterThan(first.fencingToken);
    await expectServiceError(service.refresh("state", first.lockId), GrpcStatus.FAILED_PRECONDITION);
  });

  it("refresh extends the grant", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    const grant = await service.acquire(request("state", "router-1", { ttlMs: 2000 }));

    await sleep(1000);
    const refreshed = await service.refresh("state", grant.lockId);
    await sleep(1000);
    const refreshedAgain = await service.refresh("state", grant.lockId);
    await sleep(700);

    expect(refreshed.expiresAt.getTime()).toBeGreaterThanOrEqual(grant.expiresAt.getTime() + 900);
    expect(refreshedAgain.expiresAt.getTime()).toBeGreaterThanOrEqual(refreshed.expiresAt.getTime() + 900);
    expect(refreshed.lockId).toBe(grant.lockId);
    expect(refreshed.fencingToken).toBe(grant.fencingToken);
    expect(refreshed.acquiredAt.getTime()).toBe(grant.acquiredAt.getTime());
    const description = await service.describe("state");
    expect(description.holder?.fencingToken).toBe(grant.fencingToken);
  });

  it("release of an expired grant fails", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    const grant = await service.acquire(request("state", "router-1", { ttlMs: 2000 }));
    await waitFor(async () => (await queueKeys(prefix, "state")).length === 0, 5000, "the expired grant's key to go");

    const released = await expectServiceError(service.release("state", grant.lockId), GrpcStatus.FAILED_PRECONDITION);
    const refreshed = await expectServiceError(service.refresh("state", grant.lockId), GrpcStatus.FAILED_PRECONDITION);

    expect(released.message).toBe(
      `cannot release lock "state": lock "state" is no longer held by lock id ${grant.lockId}; it expired or was released`,
    );
    expect(refreshed.message).toContain(`is no longer held by lock id ${grant.lockId}`);
  });

  it("release of a released grant fails", async () => {
    const service = await openService(uniquePrefix("locks"));
    const grant = await service.acquire(request("state", "router-1"));

    await service.release("state", grant.lockId);

    await expectServiceError(service.release("state", grant.lockId), GrpcStatus.FAILED_PRECONDITION);
  });

  it("refresh of a queued lock id fails", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    await service.acquire(request("state", "router-1"));
    const waiting = service.acquire(request("state", "router-2", { timeoutMs: 3000 }));
    await waitForWaiters(service, "state", 1);
    const waiterLockId = BigInt(await newestLeaseId(prefix, "state")).toString(16);

    const error = await expectServiceError(service.refresh("state", waiterLockId), GrpcStatus.FAILED_PRECONDITION);

    expect(error.message).toBe(`cannot refresh lock "state": lock id ${waiterLockId} is queued, not held`);
    await expectServiceError(waiting, GrpcStatus.DEADLINE_EXCEEDED);
  });

  it("fencing tokens grow across grants", async () => {
    const service = await openService(uniquePrefix("locks"));
    const tokens: bigint[] = [];

    for (let round = 0; round < 4; round++) {
      const grant = await service.acquire(request("state", `router-${round}`));
      tokens.push(grant.fencingToken);
      await service.release("state", grant.lockId);
    }

    for (let index = 1; index < tokens.length; index++) {
      expect(tokens[index]).toBeGreaterThan(tokens[index - 1]!);
    }
  });

  it("checkFence rejects a stale token", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    const old = await service.acquire(request("state", "router-1"));
    await service.release("state", old.lockId);
    const current = await service.acquire(request("state", "router-2"));

    const fence = await service.checkFence("state", current.fencingToken);
    const stale = await expectServiceError(service.checkFence("state", old.fencingToken), GrpcStatus.FAILED_PRECONDITION);

    expect(fence.lockName).toBe("state");
    expect(fence.token).toBe(current.fencingToken);
    expect(fence.etcdKey).toBe(`${prefix}/locks/state/${current.lockId}`);
    const holderKey = await raw.kv.range({ key: Buffer.from(fence.etcdKey!) });
    expect(BigInt(holderKey.kvs[0]!.create_revision)).toBe(current.fencingToken);
    expect(stale.message).toBe(
      `cannot write with fencing token ${old.fencingToken}: lock "state" is held by fencing token ${current.fencingToken}`,
    );

    await service.release("state", current.lockId);
    const free = await expectServiceError(service.checkFence("state", current.fencingToken), GrpcStatus.FAILED_PRECONDITION);
    expect(free.message).toBe(`cannot write with fencing token ${current.fencingToken}: lock "state" is free`);
  });

  it("two daemons hand over one lock", async () => {
    const prefix = uniquePrefix("locks");
    const daemons = [await openService(prefix), await openService(prefix)];
    let grant = await daemons[0]!.acquire(request("state", "daemon-0"));
    const tokens = [grant.fencingToken];

    for (let round = 1; round <= 4; round++) {
      const holder = daemons[(round - 1) % 2]!;
      const next = daemons[round % 2]!;
      const waiting = next.acquire(request("state", `daemon-${round % 2}`));
      await waitForWaiters(holder, "state", 1);
      await holder.release("state", grant.lockId);
      grant = await waiting;
      tokens.push(grant.fencingToken);
      expect(grant.owner).toBe(`daemon-${round % 2}`);
      expect((await holder.describe("state")).holder?.fencingToken).toBe(grant.fencingToken);
    }

    for (let index = 1; index < tokens.length; index++) {
      expect(tokens[index]).toBeGreaterThan(tokens[index - 1]!);
    }
  });

  it("waiters are granted in arrival order", async () => {
    const prefix = uniquePrefix("locks");
    const services = [await openService(prefix), await openService(prefix), await openService(prefix)];
    const holder = await services[0]!.acquire(request("state", "holder"));
    const order: string[] = [];
    const waits: Array<Promise<LockGrant>> = [];

    for (let index = 0; index < 3; index++) {
      const owner = `waiter-${index}`;
      waits.push(
        services[index]!.acquire(request("state", owner)).then(async (grant) => {
          order.push(owner);
          await services[index]!.release("state", grant.lockId);
          return grant;
        }),
      );
      await waitForWaiters(services[0]!, "state", index + 1);
    }
    await services[0]!.release("state", holder.lockId);
    const grants = await Promise.all(waits);

    expect(order).toEqual(["waiter-0", "waiter-1", "waiter-2"]);
    expect(grants[1]!.fencingToken).toBeGreaterThan(grants[0]!.fencingToken);
    expect(grants[2]!.fencingToken).toBeGreaterThan(grants[1]!.fencingToken);
  });

  it("waiter behind a leaving waiter keeps waiting", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    const holder = await service.acquire(request("state", "holder"));
    const leaving = new AbortController();
    const first = service.acquire(request("state", "waiter-1", { signal: leaving.signal }));
    await waitForWaiters(service, "state", 1);
    let secondGranted = false;
    const second = service.acquire(request("state", "waiter-2")).then((grant) => {
      secondGranted = true;
      return grant;
    });
    await waitForWaiters(service, "state", 2);

    leaving.abort(new Error("waiter-1 gave up"));
    await expect(first).rejects.toThrow("waiter-1 gave up");
    await sleep(300);
    expect(secondGranted).toBe(false);

    await service.release("state", holder.lockId);
    expect((await second).owner).toBe("waiter-2");
  });

  it("aborted acquire leaves nothing behind", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    const held = await service.acquire(request("state", "router-1"));
    const controller = new AbortController();
    const reason = new Error("client went away");

    const waiting = service.acquire(request("state", "router-2", { signal: controller.signal }));
    await waitForWaiters(service, "state", 1);
    const waiterLeaseId = await newestLeaseId(prefix, "state");
    controller.abort(reason);

    await expect(waiting).rejects.toBe(reason);
    expect(await queueKeys(prefix, "state")).toEqual([`${prefix}/locks/state/${held.lockId}`]);
    expect(await leaseTtl(waiterLeaseId)).toBe(-1);
  });

  it("acquire with aborted signal writes nothing", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    const controller = new AbortController();
    controller.abort(new Error("already cancelled"));

    await expect(service.acquire(request("state", "router-1", { signal: controller.signal }))).rejects.toThrow("already cancelled");
    expect(await queueKeys(prefix, "state")).toEqual([]);
  });

  it("describe reports the holder and the waiters", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    expect(await service.describe("state")).toEqual({ name: "state", holder: undefined, waiters: 0 });

    const held = await service.acquire(request("state", "router-1", { ttlMs: 8000 }));
    const waits = [
      service.acquire(request("state", "router-2", { timeoutMs: 3000 })),
      service.acquire(request("state", "router-3", { timeoutMs: 3000 })),
    ];
    await waitForWaiters(service, "state", 2);
    const description = await service.describe("state");

    expect(description.name).toBe("state");
    expect(description.waiters).toBe(2);
    expect(description.holder?.owner).toBe("router-1");
    expect(description.holder?.fencingToken).toBe(held.fencingToken);
    expect(description.holder?.acquiredAt.getTime()).toBe(held.acquiredAt.getTime());
    // etcd reports the remaining lease time in whole seconds, rounded down.
    expect(description.holder!.expiresAt.getTime()).toBeLessThanOrEqual(held.expiresAt.getTime() + 100);
    expect(description.holder!.expiresAt.getTime()).toBeGreaterThan(held.expiresAt.getTime() - 1500);
    await Promise.all(waits.map((wait) => expectServiceError(wait, GrpcStatus.DEADLINE_EXCEEDED)));
  });

  it("watchHolder follows another daemon's lock", async () => {
    const prefix = uniquePrefix("locks");
    const locker = await openService(prefix);
    const watcher = await openService(prefix);
    const seen: Array<LockDescription["holder"]> = [];

    const unsubscribe = watcher.watchHolder("state", (holder) => seen.push(holder));
    await waitFor(() => seen.length === 1, 5000, "the first holder call");
    const grant = await locker.acquire(request("state", "router-1"));
    await waitFor(() => seen.at(-1)?.fencingToken === grant.fencingToken, 5000, "the grant to be seen");
    await locker.release("state", grant.lockId);
    await waitFor(() => seen.at(-1) === undefined && seen.length > 1, 5000, "the release to be seen");
    unsubscribe();

    expect(seen[0]).toBeUndefined();
    const granted = seen.find((holder) => holder !== undefined);
    expect(granted?.owner).toBe("router-1");
    expect(granted?.name).toBe("state");
  });

  it("watchHolder tells a late listener", async () => {
    const prefix = uniquePrefix("locks");
    const service = await openService(prefix);
    const grant = await service.acquire(request("state", "router-1"));
    const early: Array<LockDescription["holder"]> = [];
    const late: Array<LockDescription["holder"]> = [];

    const stopEarly = service.watchHolder("state", (holder) => early.push(holder));
    await waitFor(() => early.length === 1, 5000, "the early listener's first call");
    const stopLate = service.watchHolder("state", (holder) => late.push(holder));
    await waitFor(() => late.length === 1, 5000, "the late listener's first call");
    stopEarly();
    stopLate();

    expect(early[0]?.fencingToken).toBe(grant.fencingToken);
    expect(late[0]?.fencingToken).toBe(grant.fencingToken);
  });

  it("close ends pending acquires", async () => {
    const prefix = uniquePrefix("locks");
    const holderService = await openService(prefix);
    const closing = await openService(prefix);
    const held = await holderService.acquire(request("state", "router-1"));
    const waiting = closing.acquire(request("state", "router-2"));
    await waitForWaiters(holderService, "state", 1);

    await closing.close();

    const error = await expectServiceError(waiting, GrpcStatus.UNAVAILABLE);
    expect(error.message).toBe('cannot acquire lock "state": the lock service is closing');
    expect(await queueKeys(prefix, "state")).toEqual([`${prefix}/locks/state/${held.lockId}`]);
    await expectServiceError(closing.acquire(request("state", "router-3")), GrpcStatus.UNAVAILABLE);
  });

  it("invalid names and ids are rejected", async () => {
    const service = await openService(uniquePrefix("locks"));

    for (const name of ["", "a/b", "tab\there", "x".repeat(129)]) {
      await expectServiceError(service.acquire(request(name, "router-1")), GrpcStatus.INVALID_ARGUMENT);
      await expectServiceError(service.describe(name), GrpcStatus.INVALID_ARGUMENT);
    }
    await expectServiceError(service.release("state", "not-hex"), GrpcStatus.INVALID_ARGUMENT);
    await expectServiceError(service.acquire(request("state", "router-1", { ttlMs: 0 })), GrpcStatus.INVALID_ARGUMENT);
    await expectServiceError(service.acquire(request("state", "router-1", { timeoutMs: -1 })), GrpcStatus.INVALID_ARGUMENT);
  });
});

describe("EtcdLockService with etcd down", () => {
  it("acquire fails with UNAVAILABLE", async () => {
    const etcd = await EtcdProcess.start();
    const client = newClient(etcd.endpoint, 500);
    try {
      const service = await EtcdLockService.open(
        { client, endpoints: [etcd.endpoint], prefix: uniquePrefix("locks-down"), requestTimeoutMs: 500, retryIntervalMs: 200 },
        silentLogger,
      );
      await etcd.kill();

      const acquired = await expectServiceError(
        service.acquire({ name: "state", owner: "router-1", ttlMs: 5000, timeoutMs: 5000, signal: new AbortController().signal }),
        GrpcStatus.UNAVAILABLE,
      );
      const described = await expectServiceError(service.describe("state"), GrpcStatus.UNAVAILABLE);

      expect(acquired.message).toContain('cannot acquire lock "state"');
      expect(acquired.message).toContain(etcd.endpoint);
      expect(described.message).toContain('cannot describe lock "state"');
      expect(described.message).toContain(etcd.endpoint);
      await service.close();
    } finally {
      client.close();
      await etcd.stop();
    }
  });

  it("watchHolder survives a compaction cancel", async () => {
    const etcd = await EtcdProcess.start();
    const proxy = await TcpProxy.start(etcd.clientPort);
    const watchClient = newClient(proxy.endpoint, 1000);
    const writeClient = newClient(etcd.endpoint, 1000);
    const { logger, lines } = captureLogger();
    const prefix = uniquePrefix("locks-compaction");
    const settings = { endpoints: [etcd.endpoint], prefix, requestTimeoutMs: 1000, retryIntervalMs: 200 };
    try {
      const watching = await EtcdLockService.open({ client: watchClient, ...settings }, logger);
      const locker = await EtcdLockService.open({ client: writeClient, ...settings }, silentLogger);
      const seen: Array<LockDescription["holder"]> = [];
      const unsubscribe = watching.watchHolder("state", (holder) => seen.push(holder));
      await waitFor(() => seen.length === 1, 5000, "the first holder call");

      // The cut drops the watch stream. While it lasts, the lock changes hands and etcd compacts
      // those revisions away, so the watch reconnects from a compacted revision and etcd cancels it.
      proxy.cut();
      await waitFor(() => lines.some((line) => line["msg"] === "holder watch disconnected"), 5000, "the watch to disconnect");
      const first = await locker.acquire(request("router-1"));
      const { header } = await writeClient.kv.range({ key: Buffer.from(`${prefix}/probe`) });
      await writeClient.kv.compact({ revision: header.revision, physical: true });
      proxy.restore();

      // On reconnect the watch reads the holder at once; etcd's cancel of the resumed watch may come later.
      await waitFor(() => seen.at(-1)?.fencingToken === first.fencingToken, 20_000, "the holder after the compaction");
      await waitFor(
        () => lines.some((line) => line["msg"] === "holder watch cancelled by etcd, watching again"),
        5000,
        "etcd to cancel the resumed watch",
      );

      // The new watch delivers later changes.
      await locker.release("state", first.lockId);
      await waitFor(() => seen.at(-1) === undefined, 5000, "the release after the new watch");
      const second = await locker.acquire(request("router-2"));
      await waitFor(() => seen.at(-1)?.fencingToken === second.fencingToken, 5000, "the next grant after the new watch");
      unsubscribe();
      await watching.close();
      await locker.close();
      expect(seen[0]).toBeUndefined();
    } finally {
      watchClient.close();
      writeClient.close();
      await proxy.close();
      await etcd.stop();
    }
  });

  // Compacting past the deletion makes etcd cancel the resumed watch. Compacting at the deletion's
  // own revision removes its tombstone, and the resumed watch starts without error but never reports it.
  it.each([
    { compaction: "past the deletion", extraWrite: true },
    { compaction: "at the deletion", extraWrite: false },
  ])("waiter wakes after compaction $compaction", async ({ extraWrite }) => {
    const etcd = await EtcdProcess.start();
    const proxy = await TcpProxy.start(etcd.clientPort);
    const waitClient = newClient(proxy.endpoint, 1000);
    const writeClient = newClient(etcd.endpoint, 1000);
    const prefix = uniquePrefix("locks-compaction");
    // A retry interval far above the test's length, so only the watch can wake the waiter.
    const settings = { endpoints: [etcd.endpoint], prefix, requestTimeoutMs: 1000, retryIntervalMs: 60_000 };
    try {
      const waiting = await EtcdLockService.open({ client: waitClient, ...settings }, silentLogger);
      const locker = await EtcdLockService.open({ client: writeClient, ...settings }, silentLogger);
      const held = await locker.acquire(request("router-1"));
      const startedAt = performance.now();
      const granted = waiting.acquire({ ...request("router-2"), timeoutMs: 20_000 });
      await waitFor(async () => (await locker.describe("state")).waiters === 1, 5000, "the waiter to queue");
      await sleep(100);

      // The cut is shorter than a third of the waiter's 10 s ttl, so no keepalive of its lease falls into it.
      proxy.cut();
      await sleep(200);
      await locker.release("state", held.lockId);
      if (extraWrite) await writeClient.put(`${prefix}/probe`).value("after the release");
      const { header } = await writeClient.kv.range({ key: Buffer.from(`${prefix}/probe`) });
      await writeClient.kv.compact({ revision: header.revision, physical: true });
      proxy.restore();

      const grant = await granted;
      expect(grant.owner).toBe("router-2");
      expect(performance.now() - startedAt).toBeLessThan(10_000);
      await waiting.release("state", grant.lockId);
      await waiting.close();
      await locker.close();
    } finally {
      waitClient.close();
      writeClient.close();
      await proxy.close();
      await etcd.stop();
    }
  });
});

function request(owner: string): AcquireOptions {
  return { name: "state", owner, ttlMs: 10_000, timeoutMs: 0, signal: new AbortController().signal };
}
