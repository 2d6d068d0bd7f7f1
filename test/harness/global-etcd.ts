import type { TestProject } from "vitest/node";
import { EtcdProcess } from "./etcd.js";
import "./provided-context.js";

/**
 * Starts the etcd shared by the whole suite. Tests isolate themselves with a
 * key prefix of their own; tests that stop etcd start a private one.
 */
export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  const etcd = await EtcdProcess.start();
  project.provide("etcdEndpoint", etcd.endpoint);
  return async () => {
    await etcd.stop();
  };
}
