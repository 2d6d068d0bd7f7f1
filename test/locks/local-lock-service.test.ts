import { status as GrpcStatus } from "@grpc/grpc-js";
import { pino } from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { LocalLockService } from "../../src/locks/local-lock-service.js";
import type { AcquireOptions, LockDescription, LockGrant } from "../../src/locks/lock-service.js";
import { ServiceError } from "../../src/server/service-error.js";
import { waitFor } from "../harness/in-process-daemon.js";

const silentLogger = pino({ level: process.env["TEST_LOG_LEVEL"] ?? "silent" });

async function expectServiceError(promise: Promise<unknown>, code: GrpcStatus): Promise<ServiceError> {
  const error: unknown = await promise.then(
    () => undefined,
    (rejection: unknown) => rejection,
  );
  expect(error).toBeInstanceOf(ServiceError);
  expect((error as ServiceError).code, (error as ServiceError).message).toBe(code);
  return error as ServiceError;
}

function request(owner: string, extra: Partial<AcquireOptions> = {}): AcquireOptions {
  return { name: "state", owner, ttlMs: 10_000, timeoutMs: 10_000, signal: new AbortController().signal, ...extra };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe("LocalLockService", () => {
  const services: LocalLockService[] = [];

  function openService(): LocalLockService {
    const service = new LocalLockService(silentLogger);
    services.push(service);
    return service;
  }

  afterEach(async () => {
    await Promise.all(services.splice(0).map((service) => service.close()));
  });

  it("acquire grants a free lock at once", async () => {
    const service = openService();

    const grant = await service.acquire(request("router-1", { ttlMs: 5000 }));

    expect(grant.name).toBe("state");
    expect(grant.owner).toBe("router-1");
    expect(grant.lockId).toMatch(/^[0-9a-f]{16}$/);
    expect(grant.fencingToken).toBeGreaterThan(0n);
    expect(grant.expiresAt.getTime() - grant.acquiredAt.getTime()).toBe(5000);
  });

  it("waiter gets the lock on release", async () => {
    const service = openService();
    const held = await service.acquire(request("router-1"));
    let grantedAt = 0;
    const waiting = service.acquire(request("router-2")).then((grant) => {
      grantedAt = performance.now();
      return grant;
    });
    await sleep(50);
    expect(grantedAt).toBe(0);

    await service.release("state", held.lockId);
    const releasedAt = performance.now();
    const grant = await waiting;

    console.log(`local lock release-to-grant ms: ${(grantedAt - releasedAt).toFixed(2)}`);
    expect(grantedAt - releasedAt).toBeLessThan(100);
    expect(grant.owner).toBe("router-2");
    expect(grant.fencingToken).toBeGreaterThan(held.fencingToken);
  });

  it("acquire times out naming the holder", async () => {
    const service = openService();
    const held = await service.acquire(request("router-1"));
    const startedAt = performance.now();

    const error = await expectServiceError(service.acquire(request("router-2", { timeoutMs: 300 })), GrpcStatus.DEADLINE_EXCEEDED);

    expect(performance.now() - startedAt).toBeGreaterThanOrEqual(299);
    expect(error.message).toBe(
      `cannot acquire lock "state": timed out after 300 ms; held by "router-1" (fencing token ${held.fencingToken}) since ${held.acquiredAt.toISOString()}`,
    );
    expect(await service.describe("state")).toMatchObject({ waiters: 0 });
  });

  it("acquire with zero timeout never waits", async () => {
    const service = openService();

    await service.acquire(request("router-1", { timeoutMs: 0 }));

    await expectServiceError(service.acquire(request("router-2", { timeoutMs: 0 })), GrpcStatus.DEADLINE_EXCEEDED);
  });

  it("unrefreshed holder expires after its ttl", async () => {
    const service = openService();
    const first = await service.acquire(request("router-1", { ttlMs: 200 }));

    const second = await service.acquire(request("router-2", { timeoutMs: 2000 }));

    expect(second.acquiredAt.getTime()).toBeGreaterThanOrEqual(first.expiresAt.getTime() - 1);
    expect(second.fencingToken).toBeGreaterThan(first.fencingToken);
    await expectServiceError(service.release("state", first.lockId), GrpcStatus.FAILED_PRECONDITION);
  });

  it("refresh extends the grant", async () => {
    const service = openService();
    const grant = await service.acquire(request("router-1", { ttlMs: 200 }));

    await sleep(120);
    const refreshed = await service.refresh("state", grant.lockId);
    await sleep(150);

    expect(refreshed.expiresAt.getTime()).toBeGreaterThanOrEqual(grant.expiresAt.getTime() + 100);
    expect(refreshed.fencingToken).toBe(grant.fencingToken);
    expect((await service.describe("state")).holder?.fencingToken).toBe(grant.fencingToken);
  });

  it("release of an expired grant fails", async () => {
    const service = openService();
    const grant = await service.acquire(request("router-1", { ttlMs: 100 }));
    await sleep(150);

    const released = await expectServiceError(service.release("state", grant.lockId), GrpcStatus.FAILED_PRECONDITION);
    await expectServiceError(service.refresh("state", grant.lockId), GrpcStatus.FAILED_PRECONDITION);

    expect(released.message).toBe(
      `cannot release lock "state": lock "state" is no longer held by lock id ${grant.lockId}; it expired or was released`,
    );
  });

  it("waiters are granted in arrival order", async () => {
    const service = openService();
    const holder = await service.acquire(request("holder"));
    const order: string[] = [];
    const waits: Array<Promise<LockGrant>> = [];

    for (let index = 0; index < 3; index++) {
      const owner = `waiter-${index}`;
      waits.push(
        service.acquire(request(owner)).then(async (grant) => {
          order.push(owner);
          await service.release("state", grant.lockId);
          return grant;
        }),
      );
    }
    expect((await service.describe("state")).waiters).toBe(3);
    await service.release("state", holder.lockId);
    const grants = await Promise.all(waits);

    expect(order).toEqual(["waiter-0", "waiter-1", "waiter-2"]);
    expect(grants[2]!.fencingToken).toBeGreaterThan(grants[1]!.fencingToken);
    expect(grants[1]!.fencingToken).toBeGreaterThan(grants[0]!.fencingToken);
  });

  it("fencing tokens grow across services", async () => {
    const first = openService();
    const second = openService();

    const a = await first.acquire(request("router-1"));
    const b = await second.acquire(request("router-2"));
    await first.release("state", a.lockId);
    const c = await first.acquire(request("router-3"));

    expect(b.fencingToken).toBeGreaterThan(a.fencingToken);
    expect(c.fencingToken).toBeGreaterThan(b.fencingToken);
  });

  it("checkFence rejects a stale token", async () => {
    const service = openService();
    const old = await service.acquire(request("router-1"));
    await service.release("state", old.lockId);
    const current = await service.acquire(request("router-2"));

    const fence = await service.checkFence("state", current.fencingToken);
    const stale = await expectServiceError(service.checkFence("state", old.fencingToken), GrpcStatus.FAILED_PRECONDITION);

    expect(fence.isCurrent()).toBe(true);
    expect(stale.message).toBe(
      `cannot write with fencing token ${old.fencingToken}: lock "state" is held by fencing token ${current.fencingToken}`,
    );
    await service.release("state", current.lockId);
    expect(fence.isCurrent()).toBe(false);
    const free = await expectServiceError(service.checkFence("state", current.fencingToken), GrpcStatus.FAILED_PRECONDITION);
    expect(free.message).toBe(`cannot write with fencing token ${current.fencingToken}: lock "state" is free`);
  });

  it("aborted acquire leaves the queue", async () => {
    const service = openService();
    const held = await service.acquire(request("router-1"));
    const controller = new AbortController();
    const reason = new Error("client went away");
    const waiting = service.acquire(request("router-2", { signal: controller.signal }));
    const after = service.acquire(request("router-3"));
    expect((await service.describe("state")).waiters).toBe(2);

    controller.abort(reason);

    await expect(waiting).rejects.toBe(reason);
    expect((await service.describe("state")).waiters).toBe(1);
    await service.release("state", held.lockId);
    expect((await after).owner).toBe("router-3");
  });

  it("describe reports the holder and the waiters", async () => {
    const service = openService();
    expect(await service.describe("state")).toEqual({ name: "state", holder: undefined, waiters: 0 });
    const held = await service.acquire(request("router-1"));
    void service.acquire(request("router-2", { timeoutMs: 200 })).catch(() => undefined);

    const description = await service.describe("state");

    expect(description).toEqual({
      name: "state",
      holder: {
        name: "state",
        owner: "router-1",
        fencingToken: held.fencingToken,
        acquiredAt: held.acquiredAt,
        expiresAt: held.expiresAt,
      },
      waiters: 1,
    });
  });

  it("watchHolder follows grants and releases", async () => {
    const service = openService();
    const seen: Array<LockDescription["holder"]> = [];
    const unsubscribe = service.watchHolder("state", (holder) => seen.push(holder));
    await waitFor(() => seen.length === 1, 1000, "the first holder call");

    const first = await service.acquire(request("router-1"));
    const waiting = service.acquire(request("router-2"));
    await service.release("state", first.lockId);
    const second = await waiting;
    await service.release("state", second.lockId);
    unsubscribe();
    await service.acquire(request("router-3"));

    expect(seen.map((holder) => holder?.owner)).toEqual([undefined, "router-1", "router-2", undefined]);
    expect(seen[2]?.fencingToken).toBe(second.fencingToken);
  });

  it("close ends pending acquires", async () => {
    const service = openService();
    await service.acquire(request("router-1"));
    const waiting = service.acquire(request("router-2"));

    await service.close();

    const error = await expectServiceError(waiting, GrpcStatus.UNAVAILABLE);
    expect(error.message).toBe('cannot acquire lock "state": the lock service is closing');
    await expectServiceError(service.acquire(request("router-3")), GrpcStatus.UNAVAILABLE);
  });

  it("invalid names are rejected", async () => {
    const service = openService();

    for (const name of ["", "a/b", "bell\u0007", "é".repeat(65)]) {
      await expectServiceError(service.acquire(request("router-1", { name })), GrpcStatus.INVALID_ARGUMENT);
      await expectServiceError(service.describe(name), GrpcStatus.INVALID_ARGUMENT);
    }
  });
});
