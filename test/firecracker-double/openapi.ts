/**
 * Firecracker's OpenAPI (Swagger 2.0) file, loaded and used to check requests the way Firecracker's
 * serde structs do: every struct has `deny_unknown_fields`, so an unknown field is an error, and the
 * messages read like serde_json's. Only the schema keywords the file uses are supported.
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';

export interface Schema {
  type?: 'object' | 'string' | 'integer' | 'number' | 'boolean' | 'array';
  $ref?: string;
  properties?: Record<string, Schema>;
  required?: string[];
  /** Only MmdsContentsObject sets it (to true): free-form JSON. */
  additionalProperties?: boolean;
  enum?: unknown[];
  minimum?: number;
  maximum?: number;
  items?: Schema;
}

interface Parameter {
  name: string;
  in: 'body' | 'path';
  required?: boolean;
  schema?: Schema;
}

interface SpecOperation {
  operationId: string;
  parameters?: Parameter[];
}

export interface ApiSpec {
  info: { version: string };
  paths: Record<string, Record<string, SpecOperation>>;
  definitions: Record<string, Schema>;
}

export interface MatchedOperation {
  operationId: string;
  method: string;
  /** The path template, e.g. `/drives/{drive_id}`. */
  template: string;
  params: Record<string, string>;
  /** Absent when the operation takes no body. */
  body?: { schema: Schema; required: boolean };
}

export type DecodedBody = { ok: true; value: unknown } | { ok: false; error: string };

const serdePrefix = 'An error occurred when deserializing the json body of a request: ';

/** Compiled code runs from dist/test/firecracker-double/ (or another out dir); the yaml stays in the source tree. */
function defaultSpecPath(): string {
  return fileURLToPath(new URL('test/firecracker-double/firecracker-api.yaml', new URL('../../../', import.meta.url)));
}

export function loadApiSpec(path: string = defaultSpecPath()): ApiSpec {
  const spec = parse(readFileSync(path, 'utf8')) as ApiSpec;
  if (!spec?.paths || !spec.definitions) throw new Error(`${path}: not a Swagger file (no paths or definitions)`);
  return spec;
}

/** Follows `$ref: "#/definitions/X"`; a `$ref`'s sibling keys (descriptions) are ignored, as Swagger says. */
export function resolveSchema(schema: Schema, spec: ApiSpec): Schema {
  let current = schema;
  for (let depth = 0; current.$ref !== undefined; depth++) {
    const name = current.$ref.replace(/^#\/definitions\//, '');
    const target = spec.definitions[name];
    if (target === undefined || depth > 16) throw new Error(`unresolvable $ref ${current.$ref}`);
    current = target;
  }
  return current;
}

function matchTemplate(template: string, segments: string[]): Record<string, string> | undefined {
  const parts = template.split('/').filter((part) => part !== '');
  if (parts.length !== segments.length) return undefined;
  const params: Record<string, string> = {};
  for (const [i, part] of parts.entries()) {
    const param = /^\{(.+)\}$/.exec(part);
    if (param) params[param[1]] = segments[i];
    else if (part !== segments[i]) return undefined;
  }
  return params;
}

/** Finds the operation for METHOD PATH; a query string and a trailing slash are ignored, as Firecracker does. */
export function matchOperation(spec: ApiSpec, method: string, urlPath: string): MatchedOperation | undefined {
  const segments = urlPath.split('?')[0].split('/').filter((segment) => segment !== '');
  for (const [template, operations] of Object.entries(spec.paths)) {
    const key = method.toLowerCase();
    const operation = Object.hasOwn(operations, key) ? operations[key] : undefined;
    const params = operation && matchTemplate(template, segments);
    if (!operation || !params) continue;
    const bodyParam = operation.parameters?.find((param) => param.in === 'body');
    // The file leaves `required` out on some bodies Firecracker still demands (PUT /machine-config
    // answers "Empty PUT request."); only an explicit `required: false` makes one optional there.
    const body = bodyParam?.schema && { schema: bodyParam.schema, required: bodyParam.required !== false };
    return { operationId: operation.operationId, method: method.toUpperCase(), template, params, ...(body && { body }) };
  }
  return undefined;
}

/** How serde_json names a JSON value in "invalid type" errors. */
function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'sequence';
  if (typeof value === 'object') return 'map';
  if (typeof value === 'string') return `string ${JSON.stringify(value)}`;
  if (typeof value === 'number') return Number.isInteger(value) ? `integer \`${value}\`` : `floating point \`${value}\``;
  return `boolean \`${String(value)}\``;
}

const expectedType: Record<NonNullable<Schema['type']>, string> = {
  object: 'a map',
  string: 'a string',
  integer: 'an integer',
  number: 'a number',
  boolean: 'a boolean',
  array: 'a sequence',
};

function hasType(type: NonNullable<Schema['type']>, value: unknown): boolean {
  switch (type) {
    case 'object':
      return typeof value === 'object' && value !== null && !Array.isArray(value);
    case 'array':
      return Array.isArray(value);
    case 'integer':
      return Number.isSafeInteger(value);
    case 'number':
      return typeof value === 'number';
    default:
      return typeof value === type;
  }
}

function backticked(names: string[]): string {
  return names.map((name) => `\`${name}\``).join(', ');
}

function unknownField(field: string, known: string[]): string {
  if (known.length === 0) return `unknown field \`${field}\`, there are no fields`;
  if (known.length === 1) return `unknown field \`${field}\`, expected ${backticked(known)}`;
  return `unknown field \`${field}\`, expected one of ${backticked(known)}`;
}

/** " at `a.b`" for nested values, nothing at the top level. */
function at(path: string): string {
  return path === '' ? '' : ` at \`${path}\``;
}

function join(path: string, key: string | number): string {
  if (typeof key === 'number') return `${path}[${key}]`;
  return path === '' ? key : `${path}.${key}`;
}

function validateObject(schema: Schema, value: Record<string, unknown>, spec: ApiSpec, path: string): string[] {
  const properties = schema.properties ?? {};
  const errors: string[] = [];
  const required = schema.required ?? [];
  for (const name of required) {
    if (!Object.hasOwn(value, name)) errors.push(`missing field \`${name}\`${at(path)}`);
  }
  for (const [name, field] of Object.entries(value)) {
    // hasOwn, not a lookup: a body's `__proto__` key must not find Object.prototype.
    const fieldSchema = Object.hasOwn(properties, name) ? properties[name] : undefined;
    if (fieldSchema === undefined) {
      if (schema.additionalProperties !== true) errors.push(unknownField(name, Object.keys(properties)) + at(path));
      continue;
    }
    // serde reads `null` as None for an Option field; only required fields cannot be null.
    if (field === null && !required.includes(name)) continue;
    errors.push(...validateValue(fieldSchema, field, spec, join(path, name)));
  }
  return errors;
}

function validateValue(schemaOrRef: Schema, value: unknown, spec: ApiSpec, path: string): string[] {
  const schema = resolveSchema(schemaOrRef, spec);
  if (schema.type !== undefined && !hasType(schema.type, value)) {
    return [`invalid type: ${describeValue(value)}, expected ${expectedType[schema.type]}${at(path)}`];
  }
  if (schema.enum !== undefined && !schema.enum.includes(value)) {
    const variants = schema.enum.map(String);
    return [`unknown variant \`${String(value)}\`, expected one of ${backticked(variants)}${at(path)}`];
  }
  if (typeof value === 'number' && schema.minimum !== undefined && value < schema.minimum) {
    return [`invalid value: ${describeValue(value)}, expected an integer >= ${schema.minimum}${at(path)}`];
  }
  if (typeof value === 'number' && schema.maximum !== undefined && value > schema.maximum) {
    return [`invalid value: ${describeValue(value)}, expected an integer <= ${schema.maximum}${at(path)}`];
  }
  if (Array.isArray(value) && schema.items !== undefined) {
    const items = schema.items;
    return value.flatMap((item, i) => validateValue(items, item, spec, join(path, i)));
  }
  if (schema.type === 'object') return validateObject(schema, value as Record<string, unknown>, spec, path);
  return [];
}

/** Every way `value` breaks `schema`, each in serde_json's words; empty when it conforms. */
export function validateBody(schema: Schema, value: unknown, spec: ApiSpec): string[] {
  return validateValue(schema, value, spec, '');
}

/** Validated values keep nulls only where serde would read None; the double treats them as absent. */
function dropNulls(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(dropNulls);
  if (typeof value !== 'object' || value === null) return value;
  const entries = Object.entries(value).filter(([, field]) => field !== null);
  return Object.fromEntries(entries.map(([key, field]) => [key, dropNulls(field)]));
}

/** Firecracker's checks on a request body, in its order: presence, JSON syntax, then the schema. */
export function decodeBody(spec: ApiSpec, operation: MatchedOperation, text: string): DecodedBody {
  if (text === '') {
    if (operation.body?.required) return { ok: false, error: `Empty ${operation.method} request.` };
    return { ok: true, value: undefined };
  }
  if (operation.method === 'GET') return { ok: false, error: 'GET request cannot have a body.' };
  if (operation.body === undefined) return { ok: true, value: undefined };
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (err) {
    return { ok: false, error: `${serdePrefix}${(err as Error).message}.` };
  }
  const errors = validateBody(operation.body.schema, value, spec);
  if (errors.length > 0) return { ok: false, error: `${serdePrefix}${errors.join('; ')}.` };
  return { ok: true, value: dropNulls(value) };
}

/** For the checks the server makes after the schema (e.g. `mem_file_path` vs `mem_backend`): same wording. */
export function deserializeError(message: string): Error {
  return new Error(`${serdePrefix}${message}.`);
}
