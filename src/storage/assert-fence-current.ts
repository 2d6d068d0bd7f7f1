import type { VerifiedFence } from "../locks/lock-service.js";
import { failedPrecondition } from "../server/service-error.js";

/** Throws FAILED_PRECONDITION when an in-process fence's grant ended after it was checked. */
export function assertFenceCurrent(fence: VerifiedFence | undefined): void {
  if (fence === undefined || fence.isCurrent()) return;
  throw failedPrecondition(
    `cannot save with fencing token ${fence.token}: lock "${fence.lockName}" was released or expired before the commit`,
  );
}
