/** Time an idempotency key is remembered. */
export const idempotencyRetentionMs = 24 * 3_600_000;

/**
 * Remembers the encoded responses of recent requests by idempotency key, in
 * this process only, for connectors without a shared store. The oldest keys
 * are forgotten first once `maxKeys` is reached.
 */
export class IdempotencyCache {
  private readonly responses = new Map<string, { storedAt: number; response: Uint8Array }>();

  constructor(private readonly maxKeys = 100_000) {}

  get(key: string): Uint8Array | undefined {
    const entry = this.responses.get(key);
    if (entry === undefined) return undefined;
    if (Date.now() - entry.storedAt > idempotencyRetentionMs) {
      this.responses.delete(key);
      return undefined;
    }
    return entry.response;
  }

  set(key: string, response: Uint8Array): void {
    this.responses.set(key, { storedAt: Date.now(), response });
    // A Map iterates in insertion order, so the first key is the oldest.
    while (this.responses.size > this.maxKeys) {
      const oldest = this.responses.keys().next().value;
      if (oldest === undefined) break;
      this.responses.delete(oldest);
    }
  }
}
