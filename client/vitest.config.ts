// Vitest configuration: unit tests and the node:http streaming test, all in Node.
import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    environment: "node",
  },
});
