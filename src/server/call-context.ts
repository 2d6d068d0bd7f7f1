import type { Logger } from "pino";

/** Information about the call that a handler serves. */
export interface CallContext {
  /**
   * Fires when the client cancels, the deadline passes, the client goes away
   * or the server shuts down. Waits inside a handler must end on it.
   */
  readonly signal: AbortSignal;
  /** Deadline of the call, if the client set one. */
  readonly deadline: Date | undefined;
  /** Address of the client, as grpc-js reports it. */
  readonly peer: string;
  /** Logger bound to this call's method and id. */
  readonly logger: Logger;
}
