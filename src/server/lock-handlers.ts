import { timestampFromDate, type Duration } from "@bufbuild/protobuf/wkt";
import type { LockHandle } from "../gen/modelmesh/state/v1/lock_pb.js";
import type { StateManagerService } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import { defaultLockName, type LockGrant, type LockService } from "../locks/lock-service.js";
import { validateId } from "../state/validate-state.js";
import type { ImplementationOf } from "./grpc-adapter.js";
import { failedPrecondition, invalidArgument } from "./service-error.js";

export interface LockSettings {
  enabled: boolean;
  defaultTtlMs: number;
  defaultTimeoutMs: number;
}

/** Maximum ttl or timeout of a request. */
const maxLockDurationMs = 24 * 3_600_000;

type LockHandlers = Pick<
  ImplementationOf<typeof StateManagerService>,
  "acquireLock" | "releaseLock" | "refreshLock" | "describeLock"
>;

/** Handlers of the lock RPCs over a LockService. */
export function lockHandlers(locks: LockService, settings: LockSettings): LockHandlers {
  const assertEnabled = (): void => {
    if (!settings.enabled) {
      throw failedPrecondition("locking is disabled on this daemon; set storage.locking.enabled to true to use locks");
    }
  };

  return {
    acquireLock: async (request, context) => {
      assertEnabled();
      validateId(request.owner, "AcquireLockRequest.owner");
      const name = lockName(request.name, "AcquireLockRequest.name");
      const ttlMs = durationMs(request.ttl, "AcquireLockRequest.ttl") ?? settings.defaultTtlMs;
      // A zero timeout takes the lock only if it is free now.
      const timeoutMs = durationMs(request.timeout, "AcquireLockRequest.timeout", true) ?? settings.defaultTimeoutMs;
      const grant = await locks.acquire({ name, owner: request.owner, ttlMs, timeoutMs, signal: context.signal });
      return { lock: toHandle(grant) };
    },

    releaseLock: async (request) => {
      assertEnabled();
      const handle = requireHandle(request.lock, "ReleaseLockRequest");
      await locks.release(handle.name, handle.lockId);
      return {};
    },

    refreshLock: async (request) => {
      assertEnabled();
      const handle = requireHandle(request.lock, "RefreshLockRequest");
      return { lock: toHandle(await locks.refresh(handle.name, handle.lockId)) };
    },

    describeLock: async (request) => {
      const name = lockName(request.name, "DescribeLockRequest.name");
      const description = await locks.describe(name);
      const holder = description.holder;
      return {
        name,
        held: holder !== undefined,
        holder: holder?.owner,
        fencingToken: holder?.fencingToken ?? 0n,
        acquiredAt: holder === undefined ? undefined : timestampFromDate(holder.acquiredAt),
        expiresAt: holder === undefined ? undefined : timestampFromDate(holder.expiresAt),
        waiters: description.waiters,
      };
    },
  };
}

/** Returns the lock name of a request, "state" when empty. */
export function lockName(name: string, path: string): string {
  if (name === "") return defaultLockName;
  validateId(name, path);
  return name;
}

function requireHandle(handle: LockHandle | undefined, requestName: string): { name: string; lockId: string } {
  if (handle === undefined) {
    throw invalidArgument(`invalid ${requestName}: lock is required; pass the LockHandle that AcquireLock returned`);
  }
  if (handle.lockId === "") {
    throw invalidArgument(`invalid ${requestName}.lock.lock_id: it is empty; pass the LockHandle that AcquireLock returned`);
  }
  return { name: lockName(handle.name, `${requestName}.lock.name`), lockId: handle.lockId };
}

function durationMs(duration: Duration | undefined, path: string, allowZero = false): number | undefined {
  if (duration === undefined) return undefined;
  const milliseconds = Number(duration.seconds) * 1000 + duration.nanos / 1e6;
  const tooSmall = allowZero ? milliseconds < 0 : milliseconds <= 0;
  if (!Number.isFinite(milliseconds) || tooSmall || milliseconds > maxLockDurationMs) {
    const range = allowZero ? "from 0 to 24h" : "above 0 and at most 24h";
    throw invalidArgument(`invalid ${path}: expected a duration ${range}, got ${milliseconds} ms`);
  }
  return milliseconds;
}

function toHandle(grant: LockGrant) {
  return {
    lockId: grant.lockId,
    owner: grant.owner,
    name: grant.name,
    acquiredAt: timestampFromDate(grant.acquiredAt),
    expiresAt: timestampFromDate(grant.expiresAt),
    fencingToken: grant.fencingToken,
  };
}
