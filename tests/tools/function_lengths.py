#!/usr/bin/env python3
"""Lists the longest function bodies in C++ headers and fails when one is longer than --max lines.

    function_lengths.py [--max N] [--top K] FILE...

A text heuristic, not a parser: comments and string literals are blanked, then a '{' opens a
function body when the text since the previous ';', '{' or '}' ends like a signature
(`...) [const] [noexcept] [override] [-> type]`, or a constructor's `) : member(`) and no
function body is already open (lambdas and local blocks count inside their function). Class
and struct bodies are scopes, not functions: their member functions are measured one by one.
Template parameter lists are skipped so that `template <class T>` is not taken for a class.
"""
import argparse
import re
import sys


def strip(src):
    src = re.sub(r'/\*.*?\*/', lambda m: '\n' * m.group(0).count('\n'), src, flags=re.S)
    src = re.sub(r'//[^\n]*', '', src)
    src = re.sub(r'"(\\.|[^"\\\n])*"', '""', src)
    src = re.sub(r"'(\\.|[^'\\\n])'", "''", src)
    return src


SIGNATURE = re.compile(r'\)\s*(const)?\s*(noexcept)?\s*(override)?\s*(->\s*[\w:<>,\s&*]+)?\s*$')
CTOR_INIT = re.compile(r'\)\s*:\s*\w')
CONTROL = re.compile(r'^(if|for|while|switch|catch)\b')
CLASS = re.compile(r'\b(class|struct|union)\s+(\w+)[^;()]*$')
TEMPLATE = re.compile(r'template\s*<(?:[^<>]|<(?:[^<>]|<[^<>]*>)*>)*>')


def functions(path):
    s = strip(open(path, encoding='utf-8').read())
    stack, found, line, last = [], [], 1, 0
    for i, c in enumerate(s):
        if c == '\n':
            line += 1
        elif c == '{':
            pre = TEMPLATE.sub(' ', s[last:i]).strip()
            in_function = any(kind == 'function' for kind, _, _ in stack)
            kind = 'block'
            if not in_function:
                if CLASS.search(pre):
                    kind = 'class'
                elif (SIGNATURE.search(pre) or CTOR_INIT.search(pre)) and not CONTROL.match(pre.split('\n')[-1].strip()):
                    kind = 'function'
            names = re.findall(r'([~\w:]+)\s*\(', pre)
            stack.append((kind, names[0] if names else '?', line))
            last = i + 1
        elif c == '}':
            if stack:
                kind, name, start = stack.pop()
                if kind == 'function':
                    found.append((line - start + 1, path, start, name))
            last = i + 1
        elif c == ';':
            last = i + 1
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--max', type=int, default=0, help='fail when a function is longer (0: only list)')
    ap.add_argument('--top', type=int, default=10)
    ap.add_argument('files', nargs='+')
    args = ap.parse_args()
    found = sorted((f for p in args.files for f in functions(p)), reverse=True)
    for n, path, start, name in found[:args.top]:
        print(f'{n:5d}  {path}:{start}  {name}')
    too_long = [f for f in found if args.max and f[0] > args.max]
    if too_long:
        print(f'{len(too_long)} function(s) longer than {args.max} lines', file=sys.stderr)
        return 1
    print(f'{len(found)} functions; the longest has {found[0][0] if found else 0} lines')
    return 0


if __name__ == '__main__':
    sys.exit(main())
