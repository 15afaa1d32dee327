#!/usr/bin/env node
// Validates Kubernetes objects offline against the API schemas of the npm package
// kubernetes-models (and @kubernetes-models/prometheus-operator for monitoring.coreos.com).
// Reads a multi-document YAML stream (kubectl kustomize output) from each file argument, or
// stdin with none; for each document picks the model class by apiVersion and kind and calls its
// validate(), then rejects fields the type does not have (see unknownFields). An unknown
// apiVersion/kind is an error, not a skip. Prints one line per object;
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

// kubernetes-models' JSON schemas, like the API's OpenAPI ones, allow properties they do not
// list, so a misspelt field (readinesProbe) would pass validate(). The packages' TypeScript
// declarations list every field of every type: this reads them (export interface ... { "f"?: T })
// and rejects a field its type does not have, descending through fields whose type is another
// interface or an Array of one. Types it cannot follow (maps, unions, the CRDs' inline object
// types) are not descended into.
const path = require("path");
const interfaces = new Map();  // exported name (IIoK8s...) or "file::local name" -> Map(field -> type)

function readDeclarations(dir) {
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      readDeclarations(full);
    } else if (entry.name.endsWith(".d.ts")) {
      const text = fs.readFileSync(full, "utf8").replace(/\/\*[\s\S]*?\*\//g, "");
      const local = new Map();
      for (const m of text.matchAll(/^export interface (\w+)[^{\n]*\{\n([\s\S]*?)^\}/gm)) {
        const fields = new Map();
        for (const f of m[2].matchAll(/^    "([^"]+)"\??: (.+?);?$/gm)) fields.set(f[1], f[2].trim());
        local.set(m[1], fields);
        interfaces.set(`${full}::${m[1]}`, fields);
      }
      for (const m of text.matchAll(/^export \{([^}]*)\}/gm)) {
        for (const pair of m[1].split(",")) {
          const [name, alias] = pair.trim().split(/\s+as\s+/);
          if (alias && local.has(name)) interfaces.set(alias, local.get(name));
        }
      }
    }
  }
}

function unknownFields(value, fields, where, out) {
  if (!fields || value === null || typeof value !== "object" || Array.isArray(value)) return;
  for (const [key, child] of Object.entries(value)) {
    const type = fields.get(key);
    if (type === undefined) {
      out.push(`${where}/${key}: unknown field`);
      continue;
    }
    let m = /^(I\w+)$/.exec(type);
    if (m) {
      unknownFields(child, interfaces.get(m[1]), `${where}/${key}`, out);
      continue;
    }
    m = /^Array<(I\w+)>$/.exec(type);
    if (m && Array.isArray(child)) {
      child.forEach((item, i) => unknownFields(item, interfaces.get(m[1]), `${where}/${key}/${i}`, out));
    }
  }
}

function topFields(apiVersion, kind) {
  const file = require.resolve(`${modelModule(apiVersion)}/${kind}`).replace(/\.js$/, ".d.ts");
  return interfaces.get(`${file}::I${kind}`);
}

function main() {
  for (const pkg of ["kubernetes-models", "@kubernetes-models/apimachinery",
                     "@kubernetes-models/prometheus-operator"]) {
    readDeclarations(path.dirname(require.resolve(`${pkg}/package.json`)));
  }
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
        const fields = topFields(obj.apiVersion, obj.kind);
        if (!fields) throw new Error(`no field list for ${obj.apiVersion} ${obj.kind}`);
        const unknown = [];
        unknownFields(obj, fields, "data", unknown);
        if (unknown.length) throw new Error(unknown.join("; "));
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
