#!/usr/bin/env node
// `npx gpu-worker [ARGS]`: find Python 3.11+, create or update a venv in ~/.gpu-worker/venv with
// gpu-fabric[engines] at this launcher's version (GPU_WORKER_PIP_SPEC overrides it: a local path, a
// wheel), then run `gpu-worker ARGS`; with no arguments, `configure` and then `start`.
"use strict";

const { spawnSync } = require("node:child_process");
const fs = require("node:fs");
const os = require("node:os");
const path = require("node:path");

const MIN = [3, 11];
const VERSION = require("../package.json").version;
const CANDIDATES = ["python3.13", "python3.12", "python3.11", "python3", "python"];

function fail(message) {
  process.stderr.write(`gpu-worker: ${message}\n`);
  process.exit(1);
}

function versionOf(python) {
  const probe = spawnSync(python, ["-c", "import sys; print('%d.%d' % sys.version_info[:2])"], { encoding: "utf8" });
  if (probe.error || probe.status !== 0) return null;
  const [major, minor] = probe.stdout.trim().split(".").map(Number);
  return Number.isInteger(major) && Number.isInteger(minor) ? [major, minor] : null;
}

function findPython() {
  const candidates = process.env.GPU_WORKER_PYTHON ? [process.env.GPU_WORKER_PYTHON] : CANDIDATES;
  const tooOld = [];
  for (const python of candidates) {
    const version = versionOf(python);
    if (!version) continue;
    if (version[0] > MIN[0] || (version[0] === MIN[0] && version[1] >= MIN[1])) return python;
    tooOld.push(`${python} is ${version.join(".")}`);
  }
  const want = `gpu-worker needs Python ${MIN.join(".")} or newer`;
  if (tooOld.length) fail(`${want}; found only ${tooOld.join(", ")}. Install a newer Python (python.org, or your package manager) or set GPU_WORKER_PYTHON.`);
  fail(`${want}, and found none (looked for ${candidates.join(", ")}). Install it (python.org, or your package manager) or set GPU_WORKER_PYTHON.`);
}

function run(command, args) {
  const result = spawnSync(command, args, { stdio: "inherit" });
  if (result.error) fail(`could not run ${command}: ${result.error.message}`);
  return result.status ?? 1;
}

function main() {
  const home = process.env.GPU_WORKER_HOME || path.join(os.homedir(), ".gpu-worker");
  const venv = path.join(home, "venv");
  const bin = path.join(venv, process.platform === "win32" ? "Scripts" : "bin");
  const venvPython = path.join(bin, process.platform === "win32" ? "python.exe" : "python");
  const spec = process.env.GPU_WORKER_PIP_SPEC || `gpu-fabric[engines]==${VERSION}`;
  const marker = path.join(home, "installed-spec");

  fs.mkdirSync(home, { recursive: true });
  if (!fs.existsSync(venvPython)) {
    const python = findPython();
    process.stderr.write(`gpu-worker: creating ${venv} with ${python}\n`);
    if (run(python, ["-m", "venv", venv]) !== 0) fail(`could not create the virtual environment ${venv}`);
  }
  // Install when the venv is new or the wanted spec changed (a newer launcher, another override).
  const installed = fs.existsSync(marker) ? fs.readFileSync(marker, "utf8") : null;
  if (installed !== spec) {
    process.stderr.write(`gpu-worker: installing ${spec} into ${venv}\n`);
    if (run(venvPython, ["-m", "pip", "install", "--upgrade", spec]) !== 0) fail(`pip could not install ${spec}`);
    fs.writeFileSync(marker, spec);
  }
  const worker = path.join(bin, process.platform === "win32" ? "gpu-worker.exe" : "gpu-worker");
  const args = process.argv.slice(2);
  if (args.length) process.exit(run(worker, args));
  const configured = run(worker, ["configure"]);
  if (configured !== 0) process.exit(configured);
  process.exit(run(worker, ["start"]));
}

main();
