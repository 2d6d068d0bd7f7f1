import { setMaxListeners } from "node:events";
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { syncPolicyName, type DaemonConfig } from "./config/daemon-config.js";
import { file_grpc_health_v1_health, HealthCheckResponse_ServingStatus } from "./gen/grpc/health/v1/health_pb.js";
import { file_grpc_reflection_v1_reflection } from "./gen/grpc/reflection/v1/reflection_pb.js";
import { file_grpc_reflection_v1alpha_reflection } from "./gen/grpc/reflection/v1alpha/reflection_pb.js";
import {
  file_modelmesh_state_v1_state_manager_service,
  StateManagerService,
} from "./gen/modelmesh/state/v1/state_manager_service_pb.js";
import { addService } from "./server/grpc-adapter.js";
import { addHealthService, HealthReporter } from "./server/health-service.js";
import { addReflectionService } from "./server/reflection-service.js";
import { stateManagerService } from "./server/state-manager-service.js";
import { createStateStore } from "./state/create-state-store.js";
import { StateManager } from "./state/state-manager.js";
import { SyncStatusFeed } from "./state/sync-status-feed.js";
import { createConnector, describeStorage } from "./storage/create-connector.js";
import { BackendProbe } from "./backend-probe.js";
import { createLockService } from "./locks/create-lock-service.js";
import { defaultLockName } from "./locks/lock-service.js";

/** A running daemon, as `startDaemon` returns it. */
export interface RunningDaemon {
  /** HOST:PORT the server listens on, with the port the kernel chose for port 0. */
  readonly address: string;
  /** Resolves true once the state is loaded and calls are served, or false if shutdown came first. */
  readonly ready: Promise<boolean>;
  /** Open WatchSyncStatus streams. */
  readonly statusSubscriberCount: number;
  /** Stops serving, writes pending state as the policy prescribes and closes storage. Resolves with the exit code. */
  shutdown(reason: string): Promise<number>;
}

/** Opens storage, starts the gRPC server and begins loading the state. */
export async function startDaemon(config: DaemonConfig, logger: Logger): Promise<RunningDaemon> {
  const connector = await createConnector(config.storage, logger);
  const manager = new StateManager({
    store: createStateStore(connector, config.storage, logger),
    connectorId: connector.id,
    policy: config.storage.persistence.syncPolicy,
    syncIntervalMs: config.storage.persistence.syncIntervalMs,
    logger,
  });
  const statusFeed = new SyncStatusFeed(manager);
  const locks = await createLockService(connector, config.storage, logger);
  const shutdownController = new AbortController();
  // Every open call listens to this signal, so thousands of listeners are expected, not a leak.
  setMaxListeners(0, shutdownController.signal);
  const adapterOptions = { logger: logger.child({ component: "grpc" }), shutdownSignal: shutdownController.signal };
  const health = new HealthReporter();
  const server = new grpc.Server({
    "grpc.max_receive_message_length": config.server.maxReceiveMessageBytes,
    // Load sends large states whole, and each client sets its own receive limit.
    "grpc.max_send_message_length": -1,
  });

  addService(
    server,
    StateManagerService,
    stateManagerService({
      manager,
      statusFeed,
      locks,
      lockSettings: {
        enabled: config.storage.locking.enabled,
        defaultTtlMs: config.storage.locking.ttlMs,
        defaultTimeoutMs: config.storage.locking.timeoutMs,
      },
      maxStateEntities: config.server.maxStateEntities,
      maxUpdateChanges: config.server.maxUpdateChanges,
      watchProgressIntervalMs: config.server.watchProgressIntervalMs,
    }),
    adapterOptions,
  );
  addHealthService(server, health, adapterOptions);
  addReflectionService(
    server,
    [
      file_modelmesh_state_v1_state_manager_service,
      file_grpc_health_v1_health,
      file_grpc_reflection_v1_reflection,
      file_grpc_reflection_v1alpha_reflection,
    ],
    adapterOptions,
  );

  const address = await bind(server, config.server.listen);
  const probe = new BackendProbe({
    connector,
    logger,
    onChange: (reachable) => {
      statusFeed.setBackendReachable(reachable);
      updateHealth(health, reachable && manager.isLoaded);
    },
  });
  manager.onStatusChange(() => updateHealth(health, probe.reachable && manager.isLoaded));
  const stopWatchingLock = locks.watchHolder(defaultLockName, (holder) => statusFeed.setLockHolder(holder));
  updateHealth(health, false);
  probe.start();
  logger.info({ address }, "state daemon listening; loading state");
  const startedFields = {
    address,
    connector: connector.id,
    policy: syncPolicyName(config.storage.persistence.syncPolicy),
    syncIntervalMs: config.storage.persistence.syncIntervalMs,
    ...describeStorage(config.storage),
  };
  const loading = manager.start().then((loaded) => {
    if (loaded) logger.info(startedFields, "state daemon started");
    return loaded;
  });

  return {
    address,
    ready: loading,
    get statusSubscriberCount() {
      return statusFeed.subscriberCount;
    },
    shutdown: async (reason) => {
      logger.info({ reason }, "state daemon stopping");
      // Health watchers see NOT_SERVING before their streams end.
      health.setAllNotServing();
      shutdownController.abort();
      await stopServer(server, config.server.shutdownTimeoutMs, logger);
      probe.stop();
      const saved = await manager.shutdown();
      await loading;
      stopWatchingLock();
      await closeQuietly("state store", () => manager.close(), logger);
      await closeQuietly("lock service", () => locks.close(), logger);
      await closeQuietly(`storage connector ${connector.id}`, () => connector.close(), logger);
      logger.info({ reason, finalSaveSucceeded: saved }, "state daemon stopped");
      return saved ? 0 : 1;
    },
  };
}

const servedServices = ["", StateManagerService.typeName];

function updateHealth(health: HealthReporter, serving: boolean): void {
  const status = serving ? HealthCheckResponse_ServingStatus.SERVING : HealthCheckResponse_ServingStatus.NOT_SERVING;
  for (const service of servedServices) health.setStatus(service, status);
}

async function bind(server: grpc.Server, listen: string): Promise<string> {
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(listen, grpc.ServerCredentials.createInsecure(), (error, boundPort) => {
      if (error === null) resolve(boundPort);
      else reject(new Error(`cannot listen on ${listen}: ${error.message}`, { cause: error }));
    });
  });
  return `${listen.slice(0, listen.lastIndexOf(":"))}:${port}`;
}

/** Lets in-flight calls finish for up to `timeoutMs`, then cancels what is left. */
async function stopServer(server: grpc.Server, timeoutMs: number, logger: Logger): Promise<void> {
  await new Promise<void>((resolve) => {
    const timer = setTimeout(() => {
      logger.warn({ timeoutMs }, "in-flight calls did not finish in time; cancelling them");
      server.forceShutdown();
      resolve();
    }, timeoutMs);
    server.tryShutdown(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

async function closeQuietly(what: string, close: () => Promise<void>, logger: Logger): Promise<void> {
  try {
    await close();
  } catch (error) {
    logger.warn({ err: error }, `cannot close the ${what} cleanly`);
  }
}
