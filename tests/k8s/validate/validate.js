#!/usr/bin/env node
// Validates Kubernetes objects offline against the API schemas of the npm package
// kubernetes-models (and @kubernetes-models/prometheus-operator for monitoring.coreos.com).
// Reads a multi-document YAML stream (kubectl kustomize output) from each file argument, or
// stdin with none; for each document picks the model class by apiVersion and kind and calls its
// validate(). An unknown apiVersion/kind is an error, not a skip. Prints one line per object;
// exits 1 if any object failed, 2 on bad input.
"use strict";
const fs = require("fs");
const YAML = require("yaml");

// apiVersion -> module. The core group is "v1"; other groups are "<group>/<version>".
function modelModule(apiVersion) {
  if (apiVersion.startsWith("monitoring.coreos.com/")) {
    return `@kubernetes-models/prometheus-operator/${apiVersion}`;
  }
  return `kubernetes-models/${apiVersion}`;
}

function modelClass(apiVersion, kind) {
  if (typeof apiVersion !== "string" || !/^[a-z0-9.\-]*\/?v[0-9a-z]+$/.test(apiVersion)) {
    throw new Error(`apiVersion ${JSON.stringify(apiVersion)} is not a group/version`);
  }
  let mod;
  try {
    mod = require(modelModule(apiVersion));
  } catch (e) {
    throw new Error(`unknown apiVersion ${apiVersion} (no schema in kubernetes-models)`);
  }
  const cls = mod[kind];
  if (typeof cls !== "function" || typeof cls.prototype.validate !== "function") {
    throw new Error(`unknown kind ${kind} in ${apiVersion} (no schema in kubernetes-models)`);
  }
  return cls;
}

function main() {
  const inputs = process.argv.length > 2 ? process.argv.slice(2) : ["/dev/stdin"];
  let ok = 0, bad = 0;
  for (const input of inputs) {
    const docs = YAML.parseAllDocuments(fs.readFileSync(input, "utf8"), { uniqueKeys: true });
    for (const doc of docs) {
      if (doc.errors.length) {
        console.error(`${input}: YAML error: ${doc.errors[0].message}`);
        process.exit(2);
      }
      const obj = doc.toJS();
      if (obj === null || obj === undefined) continue;  // an empty document
      const name = `${obj.kind}/${obj.metadata && obj.metadata.name}`;
      try {
        const Cls = modelClass(obj.apiVersion, obj.kind);
        new Cls(obj).validate();
        console.log(`ok      ${input}: ${obj.apiVersion} ${name}`);
        ok++;
      } catch (e) {
        console.log(`INVALID ${input}: ${obj.apiVersion} ${name}: ${e.message}`);
        bad++;
      }
    }
  }
  console.log(`${ok} valid, ${bad} invalid`);
  process.exit(bad ? 1 : 0);
}

main();
