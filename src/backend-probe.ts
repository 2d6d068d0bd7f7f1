import type { Logger } from "pino";
import type { StorageConnector } from "./storage/storage-connector.js";

export interface BackendProbeOptions {
  connector: StorageConnector;
  logger: Logger;
  /** Called when reachability changes, and once after the first probe. */
  onChange(reachable: boolean): void;
  /** Time between probes. Default 1 s. */
  intervalMs?: number;
}

/** Asks the storage backend at a fixed interval whether it is reachable, and reports changes. */
export class BackendProbe {
  private readonly options: BackendProbeOptions;
  private readonly logger: Logger;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private lastResult: boolean | undefined;

  constructor(options: BackendProbeOptions) {
    this.options = options;
    this.logger = options.logger.child({ component: "backend-probe", connector: options.connector.id });
  }

  /** Result of the latest probe; false before the first one. */
  get reachable(): boolean {
    return this.lastResult === true;
  }

  start(): void {
    void this.probe();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private async probe(): Promise<void> {
    const reachable = await this.options.connector.isReachable();
    if (this.stopped) return;
    if (reachable !== this.lastResult) {
      if (reachable) this.logger.info("storage backend is reachable");
      else this.logger.warn("storage backend is unreachable; health reports NOT_SERVING until it is back");
      this.lastResult = reachable;
      this.options.onChange(reachable);
    }
    this.timer = setTimeout(() => void this.probe(), this.options.intervalMs ?? 1000);
  }
}
