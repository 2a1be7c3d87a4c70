#!/usr/bin/env python3
"""The crate's import graph, read from the `use` lines and paths of src/ (test modules left out),
checked against the layering rules of docs/ARCHITECTURE.md:

  - no circle of imports between files;
  - dicom/ imports nothing else of the crate; split/ only dicom/; util/ nothing else;
  - dimse/ (the wire) imports nothing of scp/, archive/, query/, ledger/, store/, forward/, cli/;
  - store/ and ledger/ do not import each other; neither imports the layers above them;
  - query/'s pure half (index, matching, dataset, charset) imports only itself, dicom/, split/, util/.

usage: .ci/layering.py [--edges] [--sizes]   (from the repository root; exit 1 on a violation)
  --edges  prints every file's imports;  --sizes  lists files over 800 lines and functions over
  120 lines (outside test modules), the size guideline of docs/ARCHITECTURE.md.
"""
import os, re, sys

root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src'))
files={}
for d,_,fs in os.walk(root):
    for f in fs:
        if f.endswith('.rs'):
            p=os.path.join(d,f); rel=os.path.relpath(p,root)
            parts=rel[:-3].split('/')
            if parts[-1] in('mod','lib'): parts=parts[:-1]
            if rel=='main.rs': parts=['<main>']
            files['::'.join(parts)]=p
# test-only files: declared under cfg(test)
testonly=set()
for m,p in files.items():
    s=open(p).read()
    for mm in re.finditer(r'#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;',s):
        child=(m+'::' if m else '')+mm.group(1)
        testonly.add(child)
def lex(s):
    """Source with comments removed and string/char literals emptied."""
    out=[];i=0;n=len(s)
    while i<n:
        c=s[i]
        if s.startswith('//',i):
            j=s.find('\n',i); i=n if j<0 else j; continue
        if s.startswith('/*',i):
            j=s.find('*/',i+2); i=n if j<0 else j+2; continue
        if c=='r' and (i==0 or not (s[i-1].isalnum() or s[i-1]=='_')) and i+1<n and s[i+1] in '#"':
            j=i+1; h=0
            while j<n and s[j]=='#': h+=1; j+=1
            if j<n and s[j]=='"':
                end=s.find('"'+'#'*h,j+1); out.append('""'); i=n if end<0 else end+1+h; continue
        if c=='"':
            j=i+1
            while j<n and s[j]!='"':
                j+=2 if s[j]=='\\' else 1
            out.append('""'); i=j+1; continue
        if c=="'":
            # char literal or lifetime
            if i+2<n and s[i+1]=='\\':
                j=s.find("'",i+2); out.append("' '"); i=j+1; continue
            if i+2<n and s[i+2]=="'":
                out.append("' '"); i+=3; continue
        out.append(c); i+=1
    return ''.join(out)
def strip(s):
    """Lexed source without its `#[cfg(test)] mod NAME { ... }` blocks."""
    s = lex(s)
    while True:
        m = re.search(r'#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{', s)
        if not m:
            return s
        depth, i = 1, m.end()
        while depth and i < len(s):
            depth += {'{': 1, '}': -1}.get(s[i], 0)
            i += 1
        s = s[:m.start()] + s[i:]
def expand(prefix,body):
    # expand a use-tree body like {a::{b,c}, d} into paths
    out=[];depth=0;cur=''
    items=[];
    for ch in body:
        if ch=='{': depth+=1
        if ch=='}': depth-=1
        if ch==',' and depth==0: items.append(cur);cur=''
        else: cur+=ch
    items.append(cur)
    for it in items:
        it=it.strip()
        if not it: continue
        m=re.match(r'^([\w:]*?)::\{(.*)\}$',it,re.S)
        if m: out+=expand(prefix+[x for x in m.group(1).split('::') if x],m.group(2))
        else: out.append(prefix+[x for x in it.split(' as ')[0].strip().split('::') if x])
    return out
def resolve(segs):
    for n in range(len(segs),0,-1):
        k='::'.join(segs[:n])
        if k in files: return k
    return None
edges={}
for m,p in files.items():
    if m in testonly or any(m.startswith(t+'::') for t in testonly): continue
    s=strip(open(p).read())
    base = [] if m=='<main>' else (m.split('::') if m else [])
    isdir = p.endswith('mod.rs') or p.endswith('lib.rs')
    paths=[]
    for mm in re.finditer(r'\b(crate|dicomchain|super)::(\{[^;]*?\}|\*|[\w:]+)',s):
        head,rest=mm.group(1),mm.group(2)
        if head in('crate','dicomchain'): pre=[]
        else:
            pre= base if isdir else base[:-1]
            pre=pre[:-1] if isdir else pre
            # super from file a/b.rs -> module a ; from a/mod.rs -> parent of a
        while head == 'super' and rest.startswith('super::'):
            pre, rest = pre[:-1], rest[len('super::'):]
        if rest == '*': paths.append(list(pre) if pre else [''])
        elif rest.startswith('{'): paths+=expand(pre,rest[1:-1])
        else: paths.append(pre+[x for x in rest.split('::') if x])
    # self:: and `use submod::` inside mod.rs (pub use x::Y)
    if isdir:
        for mm in re.finditer(r'(?<![\w:])(?:self::)?(\w+)::',s):
            c=(m+'::' if m else '')+mm.group(1)
            if c in files: paths.append(c.split('::'))
    for segs in paths:
        t=resolve(segs)
        if t is not None and t!=m and t!='' : edges.setdefault(m,set()).add(t)
# cycles via Tarjan
idx={};low={};st=[];on=set();sccs=[];c=[0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v]=low[v]=c[0];c[0]+=1;st.append(v);on.add(v)
    for w in edges.get(v,()):
        if w not in idx: sc(w);low[v]=min(low[v],low[w])
        elif w in on: low[v]=min(low[v],idx[w])
    if low[v]==idx[v]:
        comp=[]
        while True:
            w=st.pop();on.discard(w);comp.append(w)
            if w==v:break
        if len(comp)>1: sccs.append(comp)
for v in files:
    if v not in idx: sc(v)

problems = []
for comp in sccs:
    problems.append('import cycle: ' + ' -> '.join(sorted(comp)))

def layer(m):
    return m.split('::')[0]

RULES = {
    'dicom': lambda t: layer(t) == 'dicom',
    'split': lambda t: layer(t) in ('split', 'dicom'),
    'util': lambda t: layer(t) == 'util',
    'dimse': lambda t: layer(t) not in ('scp', 'archive', 'query', 'ledger', 'store', 'forward', 'cli', 'node'),
    'store': lambda t: layer(t) not in ('ledger', 'archive', 'scp', 'dimse', 'query', 'forward', 'cli', 'node'),
    'ledger': lambda t: layer(t) not in ('store', 'archive', 'scp', 'dimse', 'query', 'forward', 'cli', 'node'),
}
# query/'s pure half: archive/ingest writes the C-FIND index with it, so it stays below archive/.
PURE_QUERY = {'query::index', 'query::matching', 'query::dataset', 'query::charset'}
for m in sorted(PURE_QUERY & set(edges)):
    for t in sorted(edges[m]):
        if t not in PURE_QUERY and layer(t) not in ('dicom', 'split', 'util'):
            problems.append(f'src/{os.path.relpath(files[m], root)} imports {t}: query/\'s pure half may not')

for m in sorted(edges):
    rule = RULES.get(layer(m))
    for t in sorted(edges[m]):
        if rule and not rule(t):
            problems.append(f'src/{os.path.relpath(files[m], root)} imports {t}: {layer(m)}/ may not')

if '--edges' in sys.argv:
    for m in sorted(edges):
        print(m, '->', ', '.join(sorted(edges[m])))

if '--sizes' in sys.argv:
    for m, p in sorted(files.items(), key=lambda kv: kv[1]):
        text = open(p).read()
        code = strip(text)
        n = code.count('\n') + 1
        if n > 800:
            print(f'src/{os.path.relpath(p, root)}: {n} lines outside tests')
        for fm in re.finditer(r'\bfn\s+(\w+)[^;{]*\{', code):
            depth, i = 1, fm.end()
            while depth and i < len(code):
                depth += {'{': 1, '}': -1}.get(code[i], 0)
                i += 1
            lines = code.count('\n', fm.start(), i) + 1
            if lines > 120:
                print(f'src/{os.path.relpath(p, root)}: fn {fm.group(1)} is {lines} lines')

for p in problems:
    print(p)
sys.exit(1 if problems else 0)
