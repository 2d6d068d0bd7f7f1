/** Time an idempotency key is remembered. */
export const idempotencyRetentionMs = 24 * 3_600_000;

/**
 * Remembers the encoded responses of recent requests by idempotency key, in
 * this process only, for connectors without a shared store. The oldest keys
 * are forgotten first once `maxKeys` keys or `maxBytes` of responses are
 * kept, so a retry after that is applied again.
 */
export class IdempotencyCache {
  private readonly responses = new Map<string, { storedAt: number; response: Uint8Array }>();
  private bytes = 0;

  constructor(
    private readonly maxKeys = 100_000,
    private readonly maxBytes = 64 * 1024 * 1024,
  ) {}

  get(key: string): Uint8Array | undefined {
    const entry = this.responses.get(key);
    if (entry === undefined) return undefined;
    if (Date.now() - entry.storedAt > idempotencyRetentionMs) {
      this.forget(key);
      return undefined;
    }
    return entry.response;
  }

  set(key: string, response: Uint8Array): void {
    this.forget(key);
    this.responses.set(key, { storedAt: Date.now(), response });
    this.bytes += response.length;
    // A Map iterates in insertion order, so the first key is the oldest.
    while (this.responses.size > this.maxKeys || this.bytes > this.maxBytes) {
      const oldest = this.responses.keys().next().value;
      if (oldest === undefined) break;
      this.forget(oldest);
    }
  }

  private forget(key: string): void {
    const entry = this.responses.get(key);
    if (entry === undefined) return;
    this.bytes -= entry.response.length;
    this.responses.delete(key);
  }
}
