(function(){
  var errors=[];
  function flush(){  // errors raised before <body> exists are shown once it does
    var box=document.getElementById("js-errors");if(!box)return;
    while(box.children.length<errors.length){var li=document.createElement("li");li.textContent=errors[box.children.length];box.appendChild(li);}
    box.setAttribute("data-count",String(errors.length));box.hidden=errors.length===0;
  }
  function show(text){errors.push(String(text));flush();}
  window.__pbErrors=errors;
  window.addEventListener("error",function(e){show((e.message||"error")+" at "+(e.filename||"")+":"+(e.lineno||""));});
  window.addEventListener("unhandledrejection",function(e){show("unhandled rejection: "+e.reason);});
  var original=console.error;
  console.error=function(){show(Array.prototype.join.call(arguments," "));return original.apply(console,arguments);};
  document.addEventListener("DOMContentLoaded",flush);
})();
