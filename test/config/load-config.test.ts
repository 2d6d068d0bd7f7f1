import { describe, expect, it } from "vitest";
import { parseDurationMs } from "../../src/config/duration.js";
import { buildConfig, ConfigError, defaultConfig } from "../../src/config/load-config.js";
import { SyncPolicy } from "../../src/gen/modelmesh/state/v1/state_pb.js";

describe("parseDurationMs()", () => {
  it.each([
    ["300s", 300_000],
    ["500ms", 500],
    ["5m", 300_000],
    ["1.5h", 5_400_000],
    ["1m30s", 90_000],
  ])("parses %s", (text, expectedMs) => {
    expect(parseDurationMs(text)).toBe(expectedMs);
  });

  it.each(["", "300", "-5s", "5 minutes", "s", "1d"])("rejects %j", (text) => {
    expect(parseDurationMs(text)).toBeUndefined();
  });
});

describe("buildConfig()", () => {
  it("uses the documented defaults without a file", () => {
    const config = buildConfig({});
    expect(config).toEqual(defaultConfig());
    expect(config.storage.persistence.syncPolicy).toBe(SyncPolicy.IN_MEMORY);
    expect(config.storage.persistence.syncIntervalMs).toBe(300_000);
    expect(config.storage.locking).toEqual({ enabled: true, timeoutMs: 30_000, retryIntervalMs: 1_000, ttlMs: 15_000 });
    expect(config.server.listen).toBe("127.0.0.1:50051");
  });

  it("reads every key of the seed's layout", () => {
    const config = buildConfig({
      yamlText: [
        "storage:",
        "  connector: modelmesh.etcd.v1",
        "  persistence:",
        "    sync_policy: periodic",
        "    sync_interval: 5m",
        "  locking:",
        "    enabled: false",
        "    timeout: 10s",
        "    retry_interval: 250ms",
        "    ttl: 20s",
        "  etcd:",
        "    endpoints: [http://127.0.0.1:23790, http://127.0.0.1:23791]",
        "    prefix: fleet/a",
        "  local_file:",
        "    path: /var/lib/modelmesh/state.bin",
        "server:",
        "  listen: 0.0.0.0:6000",
      ].join("\n"),
    });
    expect(config.storage.connector).toBe("modelmesh.etcd.v1");
    expect(config.storage.persistence).toEqual({ syncPolicy: SyncPolicy.PERIODIC, syncIntervalMs: 300_000 });
    expect(config.storage.locking).toEqual({ enabled: false, timeoutMs: 10_000, retryIntervalMs: 250, ttlMs: 20_000 });
    expect(config.storage.etcd.endpoints).toEqual(["http://127.0.0.1:23790", "http://127.0.0.1:23791"]);
    expect(config.storage.etcd.prefix).toBe("fleet/a");
    expect(config.storage.localFile.path).toBe("/var/lib/modelmesh/state.bin");
    expect(config.server.listen).toBe("0.0.0.0:6000");
  });

  it("lets environment variables override the file, and --listen both", () => {
    const config = buildConfig({
      yamlText: "storage:\n  persistence:\n    sync_policy: periodic\nserver:\n  listen: 127.0.0.1:1\n",
      environment: {
        MODELMESH_SYNC_POLICY: "immediate",
        MODELMESH_ETCD_ENDPOINTS: "http://127.0.0.1:1, http://127.0.0.1:2",
        MODELMESH_LISTEN: "127.0.0.1:2",
      },
      listen: "127.0.0.1:3",
    });
    expect(config.storage.persistence.syncPolicy).toBe(SyncPolicy.IMMEDIATE);
    expect(config.storage.etcd.endpoints).toEqual(["http://127.0.0.1:1", "http://127.0.0.1:2"]);
    expect(config.server.listen).toBe("127.0.0.1:3");
  });

  it.each([
    ["storage:\n  conector: x\n", "unknown configuration key storage.conector"],
    ["storage:\n  persistence:\n    sync_policy: sometimes\n", "invalid storage.persistence.sync_policy"],
    ["storage:\n  persistence:\n    sync_interval: 5 minutes\n", "invalid storage.persistence.sync_interval"],
    ["storage:\n  persistence:\n    sync_interval: 300\n", 'expected a positive duration such as "300s"'],
    ["storage:\n  locking:\n    enabled: yes please\n", "invalid storage.locking.enabled"],
    ["storage:\n  etcd:\n    endpoints: http://127.0.0.1:1\n", "invalid storage.etcd.endpoints"],
    ["storage:\n  etcd: 5\n", "invalid storage.etcd"],
    ["server:\n  listen: nowhere\n", "invalid server.listen"],
    ["server:\n  max_state_entities: -3\n", "invalid server.max_state_entities"],
    ["- a\n- b\n", "the top level must be a mapping"],
    ["storage: [\n", "cannot parse"],
  ])("rejects %j naming the key", (yamlText, message) => {
    expect(() => buildConfig({ yamlText, fileName: "test.yaml" })).toThrow(ConfigError);
    expect(() => buildConfig({ yamlText, fileName: "test.yaml" })).toThrow(message);
  });

  it("names the environment variable of a bad override", () => {
    expect(() => buildConfig({ environment: { MODELMESH_SYNC_INTERVAL: "soon" } })).toThrow(
      "invalid environment variable MODELMESH_SYNC_INTERVAL (storage.persistence.sync_interval)",
    );
  });
});
