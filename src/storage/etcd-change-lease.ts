import type { Etcd3 } from "etcd3";
import type { Logger } from "pino";

/** Maximum time that one idempotency lease is used for new records, in milliseconds. */
const maxRotationMs = 60 * 60 * 1000;

/**
 * The lease that a writer attaches its idempotency records to. One lease
 * serves every record that the writer creates during one rotation period,
 * min(1 h, ttl), instead of one lease per key. The lease lives ttl plus one
 * period and is never kept alive, so a record expires between ttl and
 * ttl + period after it was written. After a period a new lease is granted
 * and the old one expires on its own with its records. Leases are not
 * revoked on close, since that would delete records that have not expired.
 */
export class IdempotencyLease {
  private current: { id: string; grantedAt: number } | undefined;
  private granting: Promise<string> | undefined;
  private readonly rotationMs: number;
  private readonly ttlSeconds: number;

  constructor(
    private readonly client: Etcd3,
    ttlMs: number,
    private readonly requestTimeoutMs: number,
    private readonly logger: Logger,
  ) {
    this.rotationMs = Math.min(maxRotationMs, ttlMs);
    this.ttlSeconds = Math.ceil((ttlMs + this.rotationMs) / 1000);
  }

  /** Returns the id of the lease for records written now, granting a new one when the period of the last one ended. */
  async leaseId(): Promise<string> {
    const current = this.current;
    if (current !== undefined && Date.now() - current.grantedAt < this.rotationMs) return current.id;
    this.granting ??= this.grant().finally(() => {
      this.granting = undefined;
    });
    return await this.granting;
  }

  /** Forgets `leaseId` after etcd reported it as not found, so the next record gets a new lease. */
  invalidate(leaseId: string): void {
    if (this.current?.id === leaseId) this.current = undefined;
  }

  private async grant(): Promise<string> {
    const grantedAt = Date.now();
    const response = await this.client.leaseClient.leaseGrant(
      { TTL: this.ttlSeconds, ID: 0 },
      { deadline: grantedAt + this.requestTimeoutMs },
    );
    this.current = { id: response.ID, grantedAt };
    this.logger.debug({ leaseId: response.ID, ttlSeconds: this.ttlSeconds }, "idempotency lease granted");
    return response.ID;
  }
}
