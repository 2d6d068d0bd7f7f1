import * as grpc from "@grpc/grpc-js";
import { Health, HealthCheckResponse_ServingStatus as ServingStatus } from "../gen/grpc/health/v1/health_pb.js";
import { addService, type AdapterOptions } from "./grpc-adapter.js";
import { ServiceError } from "./service-error.js";

/** Called with the new status each time the status of a watched service changes. */
export type HealthListener = (status: ServingStatus) => void;

/**
 * Serving status of each service name the daemon reports, where the empty
 * name "" is the server as a whole. Watch calls subscribe here for changes.
 */
export class HealthReporter {
  readonly #statuses = new Map<string, ServingStatus>();
  readonly #listeners = new Map<string, Set<HealthListener>>();

  /**
   * Starts with the given statuses. By default the whole server ("") is
   * SERVING and no other name is known.
   */
  constructor(initialStatuses: Iterable<readonly [string, ServingStatus]> = [["", ServingStatus.SERVING]]) {
    for (const [service, status] of initialStatuses) {
      this.setStatus(service, status);
    }
  }

  /** Returns the status of `service`, or undefined if no status was ever set for it. */
  getStatus(service: string): ServingStatus | undefined {
    return this.#statuses.get(service);
  }

  /** Sets the status of `service` and notifies its watchers if the status changed. */
  setStatus(service: string, status: ServingStatus): void {
    if (status === ServingStatus.SERVICE_UNKNOWN) {
      // The health protocol reserves SERVICE_UNKNOWN for Watch responses about names without a status.
      throw new Error(`cannot set the health of service "${service}" to SERVICE_UNKNOWN: only Watch sends it`);
    }
    if (this.#statuses.get(service) === status) return;
    this.#statuses.set(service, status);
    for (const listener of this.#listeners.get(service) ?? []) {
      listener(status);
    }
  }

  /** Sets every known service, the whole server included, to NOT_SERVING, as a server does when it shuts down. */
  setAllNotServing(): void {
    for (const service of [...this.#statuses.keys()]) {
      this.setStatus(service, ServingStatus.NOT_SERVING);
    }
  }

  /**
   * Registers `listener` for changes of `service`, known or not, and returns
   * the function that removes it. The listener is not called for the current status.
   */
  subscribe(service: string, listener: HealthListener): () => void {
    let listeners = this.#listeners.get(service);
    if (listeners === undefined) {
      listeners = new Set();
      this.#listeners.set(service, listeners);
    }
    listeners.add(listener);
    return () => this.#unsubscribe(service, listener);
  }

  /** Number of listeners registered for all service names together. */
  get subscriberCount(): number {
    let count = 0;
    for (const listeners of this.#listeners.values()) count += listeners.size;
    return count;
  }

  #unsubscribe(service: string, listener: HealthListener): void {
    const listeners = this.#listeners.get(service);
    if (listeners === undefined) return;
    listeners.delete(listener);
    // Drops the entry so that watches of many different names leave nothing behind.
    if (listeners.size === 0) this.#listeners.delete(service);
  }
}

/** Adds the standard gRPC health service `grpc.health.v1.Health`, which reports what `reporter` contains. */
export function addHealthService(server: grpc.Server, reporter: HealthReporter, options: AdapterOptions): void {
  addService(
    server,
    Health,
    {
      check: async (request) => {
        const status = reporter.getStatus(request.service);
        if (status === undefined) {
          throw new ServiceError(
            grpc.status.NOT_FOUND,
            `cannot check health of service "${request.service}": the server reports no status for it`,
          );
        }
        return { status };
      },
      watch: async (request, context, send) => {
        await watchHealth(reporter, request.service, context.signal, async (status) => {
          await send({ status });
        });
      },
    },
    options,
  );
}

/**
 * Sends the current status of `service` at once, then each change, until
 * `signal` aborts, and then throws the abort reason. Only the latest status
 * waits in the single `pending` slot, so a slow reader skips intermediate
 * changes instead of growing a queue.
 */
async function watchHealth(
  reporter: HealthReporter,
  service: string,
  signal: AbortSignal,
  send: (status: ServingStatus) => Promise<void>,
): Promise<never> {
  let pending: ServingStatus | undefined = reporter.getStatus(service) ?? ServingStatus.SERVICE_UNKNOWN;
  let wake: (() => void) | undefined;
  const unsubscribe = reporter.subscribe(service, (status) => {
    pending = status;
    wake?.();
  });
  try {
    let lastSent: ServingStatus | undefined;
    for (;;) {
      signal.throwIfAborted();
      if (pending === undefined) {
        await new Promise<void>((resolve) => {
          const onAbort = (): void => resolve();
          signal.addEventListener("abort", onAbort, { once: true });
          wake = () => {
            signal.removeEventListener("abort", onAbort);
            resolve();
          };
        });
        wake = undefined;
        continue;
      }
      const status: ServingStatus = pending;
      pending = undefined;
      // A change and its reversal that both arrived while a send waited leave nothing new to report.
      if (status === lastSent) continue;
      await send(status);
      lastSent = status;
    }
  } finally {
    unsubscribe();
  }
}
