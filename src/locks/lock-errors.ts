import {
  deadlineExceeded,
  failedPrecondition,
  invalidArgument,
  unavailable,
  type ServiceError,
} from "../server/service-error.js";
import type { AcquireOptions, LockDescription } from "./lock-service.js";

/** Maximum length of a lock name in UTF-8 bytes. */
export const maxLockNameBytes = 128;

/** Maximum ttl or timeout in milliseconds: the longest delay Node's setTimeout accepts (about 24.8 days). */
export const maxLockDurationMs = 2 ** 31 - 1;

// C0 controls, DEL and C1 controls.
const controlCharacter = /[\u0000-\u001f\u007f-\u009f]/;

/**
 * Throws INVALID_ARGUMENT unless `name` is a usable lock name: not empty, at
 * most 128 UTF-8 bytes, without "/" (it separates etcd key segments) and
 * without control characters.
 */
export function validateLockName(name: string): void {
  if (name === "") {
    throw invalidArgument("invalid lock name: it is empty");
  }
  const bytes = Buffer.byteLength(name, "utf8");
  if (bytes > maxLockNameBytes) {
    throw invalidArgument(`invalid lock name "${name.slice(0, 40)}...": it is ${bytes} bytes, the maximum is ${maxLockNameBytes}`);
  }
  if (name.includes("/")) {
    throw invalidArgument(`invalid lock name ${JSON.stringify(name)}: it must not contain "/"`);
  }
  if (controlCharacter.test(name)) {
    throw invalidArgument(`invalid lock name ${JSON.stringify(name)}: it must not contain control characters`);
  }
}

/** Throws INVALID_ARGUMENT unless the name, owner, ttl and timeout of an acquire are usable. */
export function validateAcquireOptions(options: AcquireOptions): void {
  validateLockName(options.name);
  if (options.owner === "") {
    throw invalidArgument(`cannot acquire lock "${options.name}": the owner is empty`);
  }
  if (!Number.isFinite(options.ttlMs) || options.ttlMs <= 0 || options.ttlMs > maxLockDurationMs) {
    throw invalidArgument(
      `cannot acquire lock "${options.name}": ttl must be above 0 and at most ${maxLockDurationMs} ms, got ${options.ttlMs} ms`,
    );
  }
  if (!Number.isFinite(options.timeoutMs) || options.timeoutMs < 0 || options.timeoutMs > maxLockDurationMs) {
    throw invalidArgument(
      `cannot acquire lock "${options.name}": timeout must be from 0 to ${maxLockDurationMs} ms, got ${options.timeoutMs} ms`,
    );
  }
}

/** Throws INVALID_ARGUMENT unless `lockId` is non-empty and matches `pattern`. */
export function validateLockId(name: string, lockId: string, pattern: RegExp, expected: string): void {
  if (!pattern.test(lockId)) {
    throw invalidArgument(`invalid lock id ${JSON.stringify(lockId)} for lock "${name}": expected ${expected}`);
  }
}

/** DEADLINE_EXCEEDED for an acquire that waited `timeoutMs` in the queue, naming the holder when it is known. */
export function acquireTimedOut(name: string, timeoutMs: number, holder: LockDescription["holder"]): ServiceError {
  const heldBy =
    holder === undefined
      ? "the holder was unknown when the wait ended"
      : `held by "${holder.owner}" (fencing token ${holder.fencingToken}) since ${holder.acquiredAt.toISOString()}`;
  return deadlineExceeded(`cannot acquire lock "${name}": timed out after ${Math.round(timeoutMs)} ms; ${heldBy}`);
}

/** FAILED_PRECONDITION for a release or refresh whose grant has ended. */
export function grantEnded(action: "release" | "refresh", name: string, lockId: string): ServiceError {
  return failedPrecondition(
    `cannot ${action} lock "${name}": lock "${name}" is no longer held by lock id ${lockId}; it expired or was released`,
  );
}

/** FAILED_PRECONDITION for a refresh of a lock id that still waits in the queue. */
export function grantQueued(name: string, lockId: string): ServiceError {
  return failedPrecondition(`cannot refresh lock "${name}": lock id ${lockId} is queued, not held`);
}

/** FAILED_PRECONDITION for a write whose fencing token is not the current grant. */
export function staleFence(name: string, token: bigint, currentToken: bigint | undefined): ServiceError {
  const current = currentToken === undefined ? "is free" : `is held by fencing token ${currentToken}`;
  return failedPrecondition(`cannot write with fencing token ${token}: lock "${name}" ${current}`);
}

/** UNAVAILABLE for an acquire ended by `close()`. */
export function serviceClosing(name: string): ServiceError {
  return unavailable(`cannot acquire lock "${name}": the lock service is closing`);
}

/** Throws INVALID_ARGUMENT unless `token` can be a fencing token, which starts at 1. */
export function validateFencingToken(name: string, token: bigint): void {
  if (token <= 0n) {
    throw invalidArgument(`invalid fencing token ${token} for lock "${name}": fencing tokens start at 1`);
  }
}
