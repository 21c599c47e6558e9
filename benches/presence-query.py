#!/usr/bin/env python3
"""Presence query latency (issue 11): p50/p99 of GET /api/rooms/{room}/presence
on a room of 20,000 present users, alternating over two nodes on one Redis.

The users are written straight into the room's presence index in Redis
(`wsgate:{big}:pu`, as crates/gateway/tests/presence.rs does for 1,001), not
made by 20,000 real connections: the query path is the same. Starts a private
redis-server and two nodes from target/release (or $WSGATE_BIN) on free
loopback ports; stops them on exit.

    cargo build --release -p wsgate && python3 benches/presence-query.py
"""
import socket, subprocess, time, http.client, os, statistics, sys
def free():
    s=socket.socket(); s.bind(('127.0.0.1',0)); p=s.getsockname()[1]; s.close(); return p
ROOT=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B=os.environ.get('WSGATE_BIN', os.path.join(os.environ.get('CARGO_TARGET_DIR', os.path.join(ROOT,'target')),'release','wsgate'))
rp=free()
redis=subprocess.Popen(['redis-server','--port',str(rp),'--save','','--appendonly','no'],stdout=subprocess.DEVNULL)
time.sleep(0.5)
nodes=[];ports=[]
for i in range(2):
    p,o=free(),free()
    nodes.append(subprocess.Popen(['taskset','-c','0',B,'serve','--listen',f'127.0.0.1:{p}','--ops-listen',f'127.0.0.1:{o}','--redis-url',f'redis://127.0.0.1:{rp}','--jwt-secret','s','--api-key','k'*32,'--node-id',f'n{i}','--log','warn'],stdout=subprocess.DEVNULL))
    ports.append(p)
try:
    time.sleep(1.5)
    # 20,000 present users, written straight into the room's user index (as the truncated test does)
    pipe=subprocess.run(['redis-cli','-p',str(rp)],input='\n'.join(['ZADD wsgate:{big}:pu '+' '.join(f'0 u{j:05d}' for j in range(k,k+1000)) for k in range(0,20000,1000)])+'\n',capture_output=True,text=True)
    conns=[http.client.HTTPConnection('127.0.0.1',p) for p in ports]
    lat=[]
    for i in range(2200):
        c=conns[i%2]; t=time.perf_counter()
        c.request('GET','/api/rooms/big/presence',headers={'X-API-Key':'k'*32})
        r=c.getresponse(); body=r.read()
        d=time.perf_counter()-t
        if i==0: print(r.status, body[:80], len(body))
        if i>=200: lat.append(d*1000)
    lat.sort()
    print(f"queries {len(lat)}: p50 {lat[len(lat)//2]:.2f} ms, p99 {lat[int(len(lat)*0.99)]:.2f} ms, max {lat[-1]:.2f} ms")
finally:
    for n in nodes: n.terminate()
    redis.terminate()
