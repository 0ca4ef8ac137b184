// The launcher as a user meets it: `npm pack`, then the packed `bin` run with node.
// GPU_WORKER_PIP_SPEC points at this checkout, GPU_WORKER_HOME at a temp dir.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const pkg = path.resolve(here, "..");
const checkout = path.resolve(pkg, "..");
const launcher = path.join(pkg, "bin", "gpu-worker.js");

function tmp() {
  return fs.mkdtempSync(path.join(os.tmpdir(), "gpu-worker-npm-"));
}

function launch(bin, args, env) {
  return spawnSync(process.execPath, [bin, ...args], { encoding: "utf8", env: { ...process.env, ...env }, timeout: 600_000 });
}

function fakePython(dir, version) {
  const python = path.join(dir, "python3");
  fs.writeFileSync(python, `#!/bin/sh\necho ${version}\n`, { mode: 0o755 });
  return dir;
}

test("the launcher's version is the Python package's", () => {
  const pyproject = fs.readFileSync(path.join(checkout, "pyproject.toml"), "utf8");
  const version = pyproject.match(/^version = "([^"]+)"/m)[1];
  assert.equal(JSON.parse(fs.readFileSync(path.join(pkg, "package.json"), "utf8")).version, version);
});

test("no Python on PATH: a clear message and exit 1", () => {
  const run = launch(launcher, ["--help"], { PATH: tmp(), GPU_WORKER_HOME: tmp(), GPU_WORKER_PYTHON: "" });
  assert.equal(run.status, 1);
  assert.match(run.stderr, /needs Python 3\.11 or newer, and found none/);
});

test("only an old Python: names it and exits 1", () => {
  const run = launch(launcher, ["--help"], { PATH: fakePython(tmp(), "3.9"), GPU_WORKER_HOME: tmp(), GPU_WORKER_PYTHON: "" });
  assert.equal(run.status, 1);
  assert.match(run.stderr, /found only python3 is 3\.9/);
});

test("npm pack, then the packed launcher installs this checkout and runs gpu-worker --help", () => {
  const out = tmp();
  const pack = spawnSync("npm", ["pack", "--pack-destination", out, "--silent"], { cwd: pkg, encoding: "utf8" });
  assert.equal(pack.status, 0, pack.stderr);
  const tarball = path.join(out, pack.stdout.trim().split("\n").pop());
  assert.equal(spawnSync("tar", ["-xzf", tarball, "-C", out]).status, 0);
  const packed = path.join(out, "package", "bin", "gpu-worker.js");
  assert.ok(fs.existsSync(packed), "the tarball holds the bin");

  const home = tmp();
  const env = { GPU_WORKER_HOME: home, GPU_WORKER_PIP_SPEC: checkout };
  const run = launch(packed, ["--help"], env);
  assert.equal(run.status, 0, run.stderr);
  assert.match(run.stdout, /configure/);
  assert.match(run.stdout, /start/);
  assert.equal(fs.readFileSync(path.join(home, "installed-spec"), "utf8"), checkout);

  // A second run finds the venv up to date: no install.
  const again = launch(packed, ["--help"], env);
  assert.equal(again.status, 0, again.stderr);
  assert.doesNotMatch(again.stderr, /installing/);
});
