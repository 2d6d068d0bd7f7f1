import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { access, mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, afterEach, beforeAll, describe, expect, inject, it } from "vitest";
import { DaemonProcess } from "../harness/daemon-process.js";

// Debian's binaries, from scripts/install-system-deps.sh. A python3 earlier on
// PATH, such as a pyenv one, usually lacks grpcio.
const pythonBinary = "/usr/bin/python3";
const protocBinary = "/usr/bin/protoc";
const grpcPythonPlugin = "/usr/bin/grpc_python_plugin";

const repoRoot = fileURLToPath(new URL("../..", import.meta.url));
const clientScript = join(repoRoot, "test/python/state_client.py");
const stateProtoDir = "proto/modelmesh/state/v1";
const clientTimeoutMs = 30_000;

/** 2**60 + 1, which a double cannot hold, as the client prints it. */
const largeTokenCount = "1152921504606846977";

/** Sync status that the client reports under the immediate policy, with nothing pending or locked. */
const expectedSyncStatus = {
  policy: "SYNC_POLICY_IMMEDIATE",
  connector: "modelmesh.etcd.v1",
  pending_changes: 0,
  last_sync_set: true,
  next_sync_set: false,
  locked: false,
};

interface ProcessResult {
  exitCode: number | null;
  stdout: string;
  stderr: string;
}

let stubDir = "";

beforeAll(async () => {
  for (const binary of [pythonBinary, protocBinary, grpcPythonPlugin]) {
    try {
      await access(binary);
    } catch {
      throw new Error(`${binary} not found; install the Debian packages with: bash scripts/install-system-deps.sh`);
    }
  }

  stubDir = await mkdtemp(join(tmpdir(), "modelmesh-python-stubs-"));
  const protoFiles = (await readdir(join(repoRoot, stateProtoDir)))
    .filter((name) => name.endsWith(".proto"))
    .map((name) => `${stateProtoDir}/${name}`);
  const protoc = await runProcess(protocBinary, [
    "-Iproto",
    `--python_out=${stubDir}`,
    `--grpc_out=${stubDir}`,
    `--plugin=protoc-gen-grpc=${grpcPythonPlugin}`,
    ...protoFiles,
  ]);
  if (protoc.exitCode !== 0) {
    throw new Error(`protoc failed with exit code ${String(protoc.exitCode)} generating the Python stubs:\n${protoc.stderr}`);
  }
});

afterEach(async () => {
  await DaemonProcess.killAll();
});

afterAll(async () => {
  if (stubDir !== "") await rm(stubDir, { recursive: true, force: true });
});

describe("Python gRPC client", () => {
  it("saves, loads and locks through etcd", async () => {
    const daemon = await DaemonProcess.start({ configYaml: etcdConfigYaml(uniquePrefix()) });

    const result = parseClientOutput(await runStateClient(daemon.address));

    expect(result["mode"]).toBe("save-and-load");
    expect(result["initial_state_present"]).toBe(false);
    expect(result["fields_compared"]).toBe("all");
    expect(result["models"]).toEqual(["anthropic/claude-sonnet", "openai/gpt-4o"]);
    expect(result["providers"]).toEqual(["openai"]);
    expect(result["pools"]).toEqual(["chat-default"]);
    expect(result["tokens_used"]).toEqual({
      "anthropic/claude-sonnet": largeTokenCount,
      "openai/gpt-4o": largeTokenCount,
    });
    expect(result["timestamp"]).toEqual({ seconds: "1767225600", nanos: 123_456_789 });
    expect(result["save_status"]).toEqual(expectedSyncStatus);
    expect(result["sync_status"]).toEqual(expectedSyncStatus);
    const lock = result["lock"] as Record<string, unknown>;
    expect(lock["owner"]).toBe("python-router");
    expect(lock["name"]).toBe("state");
    expect(BigInt(lock["fencing_token"] as string)).toBeGreaterThan(0n);
    expect(lock["stream_showed_taken_and_released"]).toBe(true);
    expect(lock["stale_fence_code"]).toBe("FAILED_PRECONDITION");
    const updates = result["updates"] as Record<string, string>;
    expect(updates["tokens_after_retry"]).toBe(largeTokenCount);
    expect(updates["watched_tokens"]).toBe(largeTokenCount);
    expect(updates["watched_revision"]).toBe(updates["update_revision"]);
  });

  it("reads 50,000 models with default message limits", async () => {
    const daemon = await DaemonProcess.start({ configYaml: etcdConfigYaml(uniquePrefix()) });

    const result = parseClientOutput(await runStateClient(daemon.address, "--large"));

    expect(result["request_bytes"]).toBeGreaterThan(4 * 1024 * 1024);
    expect(result["unary_load"]).toBe("RESOURCE_EXHAUSTED");
    expect(result["stream_models"]).toBe(50_000);
    expect(result["stream_parts"]).toBeGreaterThan(1);
    expect(result["stream_equal"]).toBe(true);
  });

  it("loads the saved state after a daemon restart", async () => {
    const prefix = uniquePrefix();
    const first = await DaemonProcess.start({ configYaml: etcdConfigYaml(prefix) });
    parseClientOutput(await runStateClient(first.address));
    expect(await first.stop("SIGTERM")).toBe(0);

    const second = await DaemonProcess.start({ configYaml: etcdConfigYaml(prefix) });
    const result = parseClientOutput(await runStateClient(second.address, "--verify-only"));

    expect(result["mode"]).toBe("verify-only");
    expect(result["fields_compared"]).toBe("all");
    expect(result["tokens_used"]).toEqual({
      "anthropic/claude-sonnet": largeTokenCount,
      "openai/gpt-4o": largeTokenCount,
    });
    expect(result["sync_status"]).toEqual(expectedSyncStatus);
  });
});

/** Returns a key prefix of its own for each test, so tests sharing the suite's etcd never meet. */
function uniquePrefix(): string {
  return `modelmesh-test/python-client-${randomUUID()}`;
}

function etcdConfigYaml(prefix: string): string {
  return [
    "storage:",
    "  connector: modelmesh.etcd.v1",
    "  persistence:",
    "    sync_policy: immediate",
    "  etcd:",
    `    endpoints: [${JSON.stringify(inject("etcdEndpoint"))}]`,
    `    prefix: ${JSON.stringify(prefix)}`,
    "",
  ].join("\n");
}

async function runStateClient(address: string, ...flags: string[]): Promise<ProcessResult> {
  return await runProcess(pythonBinary, [clientScript, address, ...flags], {
    PYTHONPATH: stubDir,
    PYTHONDONTWRITEBYTECODE: "1",
  });
}

/** Checks that the client exited 0 and returns the JSON object of its one output line. */
function parseClientOutput(run: ProcessResult): Record<string, unknown> {
  expect(run.exitCode, `state_client.py failed:\n${run.stderr}${run.stdout}`).toBe(0);
  const lines = run.stdout.trim().split("\n");
  expect(lines, `expected one JSON line from state_client.py, got:\n${run.stdout}`).toHaveLength(1);
  return JSON.parse(lines[0] ?? "") as Record<string, unknown>;
}

/** Runs a program from the repository root and resolves once it exits, whatever its exit code. */
async function runProcess(command: string, args: string[], env: Record<string, string> = {}): Promise<ProcessResult> {
  return await new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      cwd: repoRoot,
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "pipe"],
      timeout: clientTimeoutMs,
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (chunk: Buffer) => (stdout += chunk.toString("utf8")));
    child.stderr.on("data", (chunk: Buffer) => (stderr += chunk.toString("utf8")));
    child.once("error", reject);
    child.once("close", (exitCode, signal) => {
      if (signal !== null) stderr += `\n${command} was ended by ${signal}; the time limit is ${clientTimeoutMs} ms`;
      resolve({ exitCode, stdout, stderr });
    });
  });
}
