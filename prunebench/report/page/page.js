(function(){
  "use strict";
  function value(row,index,numeric){
    var cell=row.cells[index];if(!cell)return null;
    var raw=cell.hasAttribute("data-v")?cell.getAttribute("data-v"):cell.textContent.trim();
    if(raw===""||raw==="-")return null;
    if(numeric){var n=parseFloat(raw);return isNaN(n)?null:n;}
    return raw.toLowerCase();
  }
  function sortTable(table,index,descending){
    var body=table.tBodies[0],header=table.tHead.rows[0].cells;
    var numeric=header[index].getAttribute("data-type")==="num";
    var items=Array.prototype.map.call(body.rows,function(row,i){return {row:row,i:i,v:value(row,index,numeric)};});
    items.sort(function(a,b){
      if(a.v===null||b.v===null){return a.v===b.v?a.i-b.i:(a.v===null?1:-1);}  // blanks last either way
      var c=numeric?a.v-b.v:a.v.localeCompare(b.v,undefined,{numeric:true});
      return (descending?-c:c)||a.i-b.i;
    });
    items.forEach(function(item){body.appendChild(item.row);});
    Array.prototype.forEach.call(header,function(th,i){
      if(i===index)th.setAttribute("aria-sort",descending?"descending":"ascending");else th.removeAttribute("aria-sort");
    });
  }
  function toggle(table,index){
    var th=table.tHead.rows[0].cells[index];
    sortTable(table,index,th.getAttribute("aria-sort")==="ascending");
  }
  function columnValues(table,index){
    var numeric=table.tHead.rows[0].cells[index].getAttribute("data-type")==="num";
    return Array.prototype.map.call(table.tBodies[0].rows,function(row){return value(row,index,numeric);});
  }
  function monotone(values,descending){
    var seenBlank=false,previous=null;
    for(var i=0;i<values.length;i++){
      var v=values[i];
      if(v===null){seenBlank=true;continue;}
      if(seenBlank)return false;
      if(previous!==null&&(descending?v>previous:v<previous))return false;
      previous=v;
    }
    return true;
  }
  function showHeatmap(key){
    var shown=0;
    Array.prototype.forEach.call(document.querySelectorAll(".heatmap"),function(div){
      div.hidden=div.getAttribute("data-key")!==key;if(!div.hidden)shown++;
    });
    return shown;
  }
  function selftest(){
    var out={errors:window.__pbErrors.length};
    try{checks(out);}catch(e){out.selftest_error=String(e);window.__pbErrors.push("selftest: "+e);}  // still report
    out.errors=window.__pbErrors.length;
    var pre=document.createElement("pre");pre.id="selftest";pre.textContent=JSON.stringify(out);
    document.body.appendChild(pre);
  }
  function checks(out){
    var table=document.getElementById("cells-table");
    out.rows=table?table.tBodies[0].rows.length:0;
    if(table){
      var heads=table.tHead.rows[0].cells,index=-1;
      for(var i=0;i<heads.length;i++){if(heads[i].textContent==="Achieved")index=i;}
      out.sort_column=index;
      heads[index].click();
      out.sorted_ascending=heads[index].getAttribute("aria-sort")==="ascending"&&monotone(columnValues(table,index),false);
      heads[index].click();
      out.sorted_descending=heads[index].getAttribute("aria-sort")==="descending"&&monotone(columnValues(table,index),true);
      var first=table.tBodies[0].rows[0];
      out.first_key_descending=first?first.getAttribute("data-key"):null;
    }
    var select=document.getElementById("heatmap-select");
    out.heatmaps=document.querySelectorAll(".heatmap").length;
    if(select&&select.options.length){
      var last=select.options[select.options.length-1].value;
      select.value=last;select.dispatchEvent(new Event("change"));
      var visible=document.querySelectorAll(".heatmap:not([hidden])");
      out.heatmap_switch=visible.length===1&&visible[0].getAttribute("data-key")===last;
      select.value=select.options[0].value;select.dispatchEvent(new Event("change"));
    }
    var root=document.documentElement;
    out.page_height=Math.max(root.scrollHeight,document.body.scrollHeight);
    out.page_overflows=root.scrollWidth>root.clientWidth;
    out.overflowing=Array.prototype.filter.call(document.querySelectorAll(".scroll"),function(div){
      return div.offsetParent!==null&&div.scrollWidth>div.clientWidth+1;
    }).map(function(div){var t=div.querySelector("table");return (t&&(t.id||t.className))||"?";});
  }
  document.addEventListener("DOMContentLoaded",function(){
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"),function(table){
      Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,index){
        th.addEventListener("click",function(){toggle(table,index);});
        th.addEventListener("keydown",function(e){if(e.key==="Enter"||e.key===" "){e.preventDefault();toggle(table,index);}});
      });
    });
    var select=document.getElementById("heatmap-select");
    if(select){select.addEventListener("change",function(){showHeatmap(select.value);});showHeatmap(select.value);}
    if(location.hash==="#selftest")selftest();
  });
})();
