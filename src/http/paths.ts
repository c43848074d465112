/**
 * Path canonicalisation, before routing and before the ACL sees a path: one spelling per
 * resource, so a policy on `secret/data/a` cannot be side-stepped with `secret/data/x/../a`,
 * `secret%2Fdata%2Fa` or `secret//data/a`.
 */
import { InvalidRequest } from '../core/errors';

export function canonicalPath(rawPath: string): string {
  // Encoded separators and NULs are refused outright rather than decoded into meaning.
  if (/%2f|%5c|%00/i.test(rawPath)) throw new InvalidRequest('invalid path: encoded "/", "\\" or NUL');
  let decoded: string;
  try {
    decoded = decodeURIComponent(rawPath);
  } catch {
    throw new InvalidRequest('invalid path: bad percent-encoding');
  }
  if (/[\u0000-\u001f\u007f\\]/.test(decoded)) throw new InvalidRequest('invalid path: control characters or "\\"');
  const trailing = decoded.endsWith('/');
  const segments = decoded.split('/').filter((s) => s !== '');
  if (segments.some((s) => s === '.' || s === '..')) throw new InvalidRequest('invalid path: "." and ".." segments are not allowed');
  if (segments.length && segments[segments.length - 1].endsWith('.')) throw new InvalidRequest('unsupported path');
  const joined = segments.join('/');
  return trailing && joined ? joined + '/' : joined;
}
