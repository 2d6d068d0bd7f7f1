import "vitest";

declare module "vitest" {
  /** Values that the global setup hands to every test file through `inject`. */
  export interface ProvidedContext {
    /** Client URL of the etcd shared by the suite. */
    etcdEndpoint: string;
  }
}
